"""Keeps a local run from hanging or outliving job.py.

The simulator, POC, torchrun and the ranks each start in a process session of their own, so a
signal to job.py does not reach them, and NVFlare's simulator does not end a job when a site ends
its run before its trainer's handshake. While a run is under way, this module:
- makes job.py the parent of last resort of everything the run starts (Linux's child subreaper), so
  no process can slip out of job.py's process tree;
- turns SIGTERM, SIGINT and SIGHUP (a closed terminal) into a `Stopped` exception in job.py's main thread,
  once: from then on, and during teardown, a signal is only noted, so that nothing interrupts the cleanup;
- watches the sites' logs and ends the run as soon as a site has ended its own: FedAvg here
  needs every site in every round;
- when the run is over, for whatever reason, ends every process it left behind.
"""

import ctypes
import os
import signal
import sys
import threading
import time

import psutil

from local_run.results import NVFLARE_SITE_ENDED

PR_SET_CHILD_SUBREAPER = 36


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """job.py got SIGTERM, SIGINT or SIGHUP. Like KeyboardInterrupt, it is no Exception: NVFlare's code that waits for a
    job catches Exception and would swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


def end_all_children() -> None:
    """SIGKILL every descendant of this process, until none is left."""
    for _ in range(50):
        alive = []
        for p in psutil.Process().children(recursive=True):
            try:  # any of them may end on its own meanwhile
                if p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            break
        psutil.wait_procs(alive, timeout=2)
    while True:  # reap the orphans this process adopted
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def reap_adopted(adopted: set[int]) -> None:
    """Reap the adopted processes that have ended. A dead one would otherwise stay a zombie of job.py's, and a
    zombie's pid still answers: NVFlare's POC, for one, would take its server for running and never clean up.
    Processes that job.py started itself are left to whoever waits for them."""
    me = os.getpid()
    for p in psutil.Process(me).children(recursive=True):
        try:
            if p.ppid() != me:
                adopted.add(p.pid)
            elif p.pid in adopted and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
                adopted.discard(p.pid)
        except (psutil.NoSuchProcess, ChildProcessError):
            adopted.discard(p.pid)


class Watchdog:
    """`with Watchdog(logs_root, sites) as watchdog:` around a run; logs_root None: no site logs to watch (a real
    system). A `Stopped` raised inside the block ends the block; `watchdog.signum` then names the signal."""

    def __init__(self, logs_root: str | None, sites: list[str], poll: float = 0.5):
        self.logs_root, self.sites, self.poll = logs_root, sites, poll
        self.ended_sites: list[str] = []
        self.signum: int | None = None  # the first signal job.py got, if any
        self._holding = False  # True once signals are only noted
        self._seen = dict.fromkeys(sites, 0)  # how much of each site's log has been read
        self._started = time.time()  # a log older than this is a previous run's, before the simulator clears it
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._handlers = {}

    def __enter__(self) -> "Watchdog":
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
        for signum in SIGNALS:
            self._handlers[signum] = signal.signal(signum, self._on_signal)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.hold_signals()
        self._done.set()
        self._thread.join()
        end_all_children()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        return isinstance(exc, Stopped)  # the signal is in self.signum

    def hold_signals(self) -> None:
        """From now on a signal is noted in self.signum, not raised: call it before teardown."""
        self._holding = True

    def _on_signal(self, signum, frame):
        self.signum = self.signum or signum
        if not self._holding:
            self._holding = True  # a second Ctrl-C must not interrupt the cleanup
            raise Stopped(signum)

    def _watch(self) -> None:
        adopted = set()  # processes first seen below another one: job.py's own only once their parent is gone
        while not self._done.wait(self.poll):
            try:
                reap_adopted(adopted)
                for site in self.sites if self.logs_root else []:
                    if site not in self.ended_sites and NVFLARE_SITE_ENDED in self._new_log_text(site):
                        self.ended_sites.append(site)
                if self.ended_sites:  # NVFlare's simulator would wait for its result for ever
                    end_all_children()
                    return
            except Exception as e:  # a watchdog that died would let the run hang: say what happened, go on
                print(f"job.py's watchdog: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def _new_log_text(self, site: str) -> str:
        """What the site's log gained since the last look, from the end of the last whole line read before."""
        path = os.path.join(self.logs_root, site, "log.txt")
        try:
            if os.stat(path).st_mtime < self._started:
                return ""
            with open(path, "rb") as f:
                f.seek(self._seen[site])
                text = f.read()
        except OSError:
            return ""
        self._seen[site] += text.rfind(b"\n") + 1
        return text.decode(errors="replace")
