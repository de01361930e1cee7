"""Runs a command with the NVFlare server's port shaped to a link's rate, each way, as a site behind a slow link
sees it; the rest of loopback (each site's client and its trainer, torchrun) keeps its own speed.

It works in the network namespace it starts in, which must be a new one of its own: run it under `unshare --net`
(as a normal user, `unshare --user --map-root-user --net`). It raises loopback, puts an HTB qdisc on it, starts the
command, reads the server's port from its log once the server listens, and sends what the server sends (source
port) and what it receives (destination port) through a class of MBIT Mbit/s each. At the end it prints what
crossed the link each way and exits with the command's exit code. HTB and u32 filters work on the 2-core machine's
kernel; netem does not.

  unshare --net python benchmarks/slow_link.py 100 WORKSPACE/<job>/server/log.txt python job.py ...
"""

import os
import re
import subprocess
import sys
import threading
import time

# What makes a network namespace of one's own: root makes it directly; a normal user makes a user namespace first, in
# which it is root (Linux allows that by default: unprivileged user namespaces). Add "--net" and the command.
UNSHARE = ["unshare"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user"]
# The server's listener for the sites, as NVFlare logs it (the admin listener's line ends in ?admin_listener=true).
LISTENER = re.compile(r"server: creating listener on \w+://[^:\s]+:(\d+)$", re.MULTILINE)
DOWN, UP = "1:10", "1:20"  # the classes: from the server (its port as the source), to it (as the destination)


def sbin(*command: str) -> str:
    """Runs iproute2's `command` (tc, ip: in sbin, which a normal user's PATH may lack); returns its output."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PATH": path})
    return done.stdout


def shape_lo(mbit: float) -> None:
    """Loopback up, with an HTB qdisc whose two classes each carry mbit Mbit/s; unclassified traffic is not shaped
    (HTB sends what no filter matches at once)."""
    sbin("ip", "link", "set", "lo", "up")
    sbin("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
    for classid in (DOWN, UP):
        sbin("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", classid, "htb", "rate", f"{mbit}mbit",
             "ceil", f"{mbit}mbit", "burst", "128k", "cburst", "128k", "quantum", "65536")  # fmt: skip


def server_port(server_log: str, process: subprocess.Popen) -> int | None:
    """The port the server listens on for the sites, once its log says it; None if the command ended first."""
    while process.poll() is None:
        try:
            with open(server_log) as f:
                found = LISTENER.search(f.read())
        except FileNotFoundError:
            found = None
        if found:
            return int(found[1])
        time.sleep(0.1)
    return None


def send_through_link(port: int) -> None:
    # IPv4 only: NVFlare's server listens on 0.0.0.0.
    for direction, classid in (("sport", DOWN), ("dport", UP)):
        sbin("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
             "ip", direction, str(port), "0xffff", "flowid", classid)  # fmt: skip


def crossed() -> dict[str, int]:
    """Bytes each class has sent so far."""
    shown = sbin("tc", "-s", "class", "show", "dev", "lo")
    return {m[1]: int(m[2]) for m in re.finditer(r"class htb (\S+) .*?\n\s*Sent (\d+) bytes", shown)}


def main() -> int:
    if len(sys.argv) < 4:
        print(f"usage: unshare --net python {sys.argv[0]} MBIT SERVER_LOG COMMAND...", file=sys.stderr)
        return 2
    mbit, server_log, command = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    shape_lo(mbit)
    process = subprocess.Popen(command)
    ports = []

    def shape_server() -> None:
        ports.append(server_port(server_log, process))
        if ports[0] is not None:
            send_through_link(ports[0])

    watcher = threading.Thread(target=shape_server, daemon=True)
    watcher.start()
    code = process.wait()
    watcher.join()
    if ports[0] is None:
        print(f"slow link: the server's port never appeared in {server_log}: nothing was shaped", file=sys.stderr)
        return code or 1
    sent = crossed()
    print(f"slow link: {mbit:g} Mbit/s each way on port {ports[0]}: {sent.get(DOWN, 0):,} bytes down, "
          f"{sent.get(UP, 0):,} bytes up", flush=True)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
