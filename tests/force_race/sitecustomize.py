"""For tests and benchmarks/startup_stress.sh: forces the start-up race that race_free_simulator.py fixes.

With this folder on PYTHONPATH, a simulator process holds each client thread's first message to its worker until
both threads have written their client's name into `build_ctx`, and only then lets them send. NVFlare 2.9.0's
simulator, unfixed, then sends both workers the same name: the mix-up happens on every run, not by chance."""

import os
import sys
import threading

SIMULATORS = ("race_free_simulator.py", "nvflare.private.fed.app.simulator.simulator")
argv = sys.orig_argv
nvflare_cli = "simulator" in argv and any(os.path.basename(arg) == "nvflare" for arg in argv)

if nvflare_cli or any(arg.endswith(SIMULATORS) for arg in argv):
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

    both_named = threading.Barrier(2, timeout=60)
    held = threading.Semaphore(2)  # only the first message of each of the two threads waits
    create_connection = SimulatorClientRunner._create_connection

    class HeldConnection:
        def __init__(self, conn):
            self._conn = conn

        def send(self, data):
            if held.acquire(blocking=False):
                try:
                    both_named.wait()
                except threading.BrokenBarrierError:  # a single client: nothing to race with
                    pass
            self._conn.send(data)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    def held_connection(self, *args, **kwargs):
        return HeldConnection(create_connection(self, *args, **kwargs))

    SimulatorClientRunner._create_connection = held_connection
