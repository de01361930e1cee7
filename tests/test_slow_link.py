"""benchmarks/slow_link.py, the shaping behind `model_size.py --link_mbit`: what goes to and from the port the server's
log names crosses a link of the rate given, each way, and other loopback traffic keeps its speed."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ISOLATED, ROOT, UNSHARE

pytestmark = pytest.mark.skipif(
    not ISOLATED, reason="shapes loopback in a network namespace of its own: needs root or unprivileged user namespaces"
)

MBIT = 16
# A server that logs its listener as NVFlare's does, and a second listener it does not log; a client that takes
# DOWN bytes from the first and sends it UP bytes, then takes OTHER bytes from the second. Prints each one's seconds.
PEERS = """
import json, socket, sys, threading, time
DOWN, UP, OTHER = 2_000_000, 1_000_000, 4_000_000
server, other = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
with open(sys.argv[1], "w") as log:
    log.write(f"2026-12-04 06:00:00,000 - CoreCell - INFO - server: creating listener on tcp://0:{server.getsockname()[1]}\\n")
time.sleep(2)  # slow_link.py reads the log every 0.1 s

def serve():
    connection, _ = server.accept()
    connection.sendall(b"d" * DOWN)
    received = 0
    while received < UP:
        received += len(connection.recv(1 << 20))
    connection.sendall(b"k")
    connection.close()
    connection, _ = other.accept()
    connection.sendall(b"o" * OTHER)
    connection.close()

def take(connection, count):
    taken = 0
    while taken < count:
        taken += len(connection.recv(1 << 20))

threading.Thread(target=serve).start()
seconds = {}
with socket.create_connection(server.getsockname()) as connection:
    started = time.monotonic()
    take(connection, DOWN)
    seconds["down"] = time.monotonic() - started
    started = time.monotonic()
    connection.sendall(b"u" * UP)
    take(connection, 1)
    seconds["up"] = time.monotonic() - started
with socket.create_connection(other.getsockname()) as connection:
    started = time.monotonic()
    take(connection, OTHER)
    seconds["other"] = time.monotonic() - started
print(json.dumps(seconds))
"""


def test_the_servers_port_crosses_a_link_of_the_rate_given_each_way_and_other_ports_do_not(tmp_path):
    peers, log = tmp_path / "peers.py", tmp_path / "server" / "log.txt"
    peers.write_text(PEERS)
    log.parent.mkdir()
    slow_link = os.path.join(ROOT, "benchmarks", "slow_link.py")
    result = subprocess.run(
        [*UNSHARE, "--net", sys.executable, slow_link, str(MBIT), str(log), sys.executable, str(peers), str(log)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seconds = json.loads(result.stdout.splitlines()[0])
    # No faster than the link: 2 MB down and 1 MB up at 16 Mbit/s are 1.0 and 0.5 s (HTB's 128 KiB burst aside).
    assert seconds["down"] >= 0.9 and seconds["up"] >= 0.4, seconds
    # 4 MB from the port the log does not name, at loopback's speed, where the link would take 2 s.
    assert seconds["other"] < 1.0, seconds
    crossed = re.search(
        r"slow link: 16 Mbit/s each way on port \d+: ([\d,]+) bytes down, ([\d,]+) bytes up", result.stdout
    )
    assert crossed, result.stdout
    down, up = (int(n.replace(",", "")) for n in crossed.groups())
    assert 2_000_000 <= down < 2_200_000 and 1_000_000 <= up < 1_200_000, (down, up)  # the other 4 MB not among them
