"""Run a command with its NVFlare server behind a slow link: `python shape_server_link.py RATE COMMAND...`, inside a
network namespace of its own (unshare --net), where it may change loopback's queueing (CAP_NET_ADMIN there).

Only the server's traffic is shaped, as a site's link to a remote server would be: HTB on loopback, with u32 filters
that put every packet from or to the ports the server listens on into a class of RATE each way (full duplex), with
a short queue (50 packets) as a router's; everything else (a site's client and its trainer, the ranks) keeps
loopback's speed. The server is the first process of the command that listens on loopback (NVFlare's simulator
starts its server before its sites). Prints one line with the ports it shaped; exits with the command's code."""

import re
import subprocess
import sys
import time


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True)


def listeners() -> list[tuple[int, int]]:
    """(port, pid) of every TCP socket listening on loopback, in the order ss lists them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [(int(port), int(pid)) for port, pid in re.findall(r"127\.0\.0\.1:(\d+)\s.*?pid=(\d+)", out)]


def main() -> int:
    rate, command = sys.argv[1], sys.argv[2:]
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)  # packets of a real link's size
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
    tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit", "quantum", "60000")
    for flow in ("1:20", "1:30"):  # what the server sends; what it receives
        tc("class", "add", "dev", "lo", "parent", "1:", "classid", flow, "htb", "rate", rate, "ceil", rate)
        tc("qdisc", "add", "dev", "lo", "parent", flow, "pfifo", "limit", "50")
    job = subprocess.Popen(command)
    server = None
    while server is None and job.poll() is None:
        server = next((pid for _, pid in listeners()), None)
        time.sleep(0.1)
    if server is not None:
        time.sleep(1.0)  # the server's other ports
        ports = sorted(port for port, pid in listeners() if pid == server)
        for port in ports:
            for field, flow in (("sport", "1:20"), ("dport", "1:30")):
                tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                   "match", "ip", field, str(port), "0xffff", "flowid", flow)  # fmt: skip
        print(f"shape_server_link: the server's ports {ports} at {rate} each way", file=sys.stderr, flush=True)
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
