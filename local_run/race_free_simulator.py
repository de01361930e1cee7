"""NVFlare's simulator, less a start-up race of nvflare 2.9.0 that sets one site up under another's name.

The race: `SimulatorClientRunner.do_one_task` (nvflare/private/fed/app/simulator/simulator_runner.py, 2.9.0)
writes the client's name into `self.build_ctx`, one dict that every client thread shares (line 771), then sends
that dict to the client's worker process (line 780). The worker takes its name from the dict, but its workspace
from its own command line. When two threads reach those lines together, which their common 1-second polling
makes likely, one site's worker sets its trainer up under the other's name and fails:
FileNotFoundError: .../site-1/simulate_job/app_site-2/.client_api_bootstrap-*.tmp, then FATAL_SYSTEM_ERROR.

The fix: each thread reads its own copy of `build_ctx`, so no thread's name lands in another's message. It is
applied only to the NVFlare version it was checked against, and it refuses to run if that code has changed.
Delete this module once NVFlare's `do_one_task` sends a copy of its own.

Run it as NVFlare's simulator CLI is run:  python local_run/race_free_simulator.py JOB_FOLDER -w WORKSPACE -n 2 -t 2
job.py's `--env sim` runs the job through it (`SimEnv` below)."""

import contextlib
import inspect
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time

import nvflare
import psutil
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner
from nvflare.recipe import SimEnv as NVFlareSimEnv

CHECKED_VERSION = "2.9.0"
# The lines of do_one_task the fix depends on, in this order: the shared dict written, then sent.
RACY_LINES = ('self.build_ctx["client_name"] = client.client_name', "SimulatorConstants.BUILD_CTX: self.build_ctx")


class PerThreadBuildCtx:
    """`SimulatorClientRunner.build_ctx`, as a data descriptor: it stores the dict that NVFlare assigns, and hands
    each thread a copy of its own, so that a name one thread writes is never the one another thread sends."""

    def __init__(self):
        self._local = threading.local()

    def __set__(self, runner, ctx) -> None:
        runner.__dict__["_shared_build_ctx"] = ctx

    def __get__(self, runner, owner=None):
        if runner is None:
            return self
        shared = runner.__dict__.get("_shared_build_ctx")
        copies = self._local.__dict__.setdefault("copies", {})  # id(runner) -> (the shared dict, this thread's copy)
        if shared is None:
            return None
        kept = copies.get(id(runner))
        if kept is None or kept[0] is not shared:
            kept = copies[id(runner)] = (shared, dict(shared))
        return kept[1]


class SimulatorChanged(RuntimeError):
    pass


def patch_simulator() -> bool:
    """Install PerThreadBuildCtx on NVFlare's SimulatorClientRunner; False, with a warning, on an NVFlare version
    this was not checked against."""
    if isinstance(SimulatorClientRunner.__dict__.get("build_ctx"), PerThreadBuildCtx):
        return True
    if nvflare.__version__ != CHECKED_VERSION:
        print(
            f"WARNING: race_free_simulator.py was checked against nvflare {CHECKED_VERSION}, not "
            f"{nvflare.__version__}; NVFlare's simulator runs unchanged",
            file=sys.stderr,
        )
        return False
    source = inspect.getsource(SimulatorClientRunner.do_one_task)
    where = [source.find(line) for line in RACY_LINES]
    if -1 in where or where != sorted(where):
        raise SimulatorChanged(
            "nvflare's SimulatorClientRunner.do_one_task is not the code race_free_simulator.py corrects; "
            "check whether NVFlare fixed the race, then delete the module or update it"
        )
    SimulatorClientRunner.build_ctx = PerThreadBuildCtx()
    return True


def console_log(workspace_root: str, job_name: str) -> str:
    """Where SimEnv keeps the simulator's console output: beside the job's workspace, which the simulator clears."""
    return os.path.join(workspace_root, f"{job_name}.console.log")


# What a quiet run still shows: NVFlare's warnings and errors, and this module's own (SimulatorChanged, a version).
LOUD = re.compile(r" - (WARNING|ERROR|CRITICAL) - |^(WARNING|ERROR): ")


class SimEnv(NVFlareSimEnv):
    """NVFlare's SimEnv, which runs the job through this module instead of NVFlare's simulator CLI. Quiet (the
    default): the simulator's console output goes to console_log(), and only its warnings and errors reach
    stderr; NVFlare's own logs are in the workspace either way."""

    def __init__(self, *, quiet: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.quiet = quiet
        self.server_pid = None  # NVFlare's server process: the simulator's child that writes the server's log
        self.server_signal = None  # the signal that killed it (or the simulator), if one did

    def deploy(self, job) -> str:
        workspace = os.path.join(self.workspace_root, job.name)
        self._ensure_default_component_policy(workspace)  # as NVFlare's SimEnv does
        with tempfile.TemporaryDirectory() as job_root:
            job.export_job(job_root)
            command = [sys.executable, os.path.abspath(__file__), os.path.join(job_root, job.name), "-w", workspace]
            command += ["-c", ",".join(self.clients), "-t", str(self.num_threads)]
            command += ["-gpu", self.gpu_config] if self.gpu_config else []
            command += ["-l", self.log_config] if self.log_config else []
            code = self._run(command, console_log(self.workspace_root, job.name), os.path.join(workspace, "server"))
        # The simulator exits with its server process's exit code, which is minus the signal that killed it (so
        # 256 - N); its own death by a signal shows as -N.
        signum = -code if code < 0 else 256 - code if code > 128 else None
        if signum in set(signal.Signals):
            self.server_signal = signal.Signals(signum)
        if code != 0:
            raise RuntimeError(f"the simulator exited with code {code}; logs under {workspace}")
        return job.name

    def _run(self, command: list[str], log_path: str, server_folder: str) -> int:
        with open(log_path, "w") as log:
            # In a session of its own, as NVFlare's SimEnv starts it: a Ctrl-C reaches job.py alone.
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                start_new_session=True,
            )  # fmt: skip
            copier = threading.Thread(target=self._copy, args=(process.stdout, log), daemon=True)
            copier.start()
            threading.Thread(target=self._find_server, args=(process, server_folder), daemon=True).start()
            try:
                process.wait()
            finally:  # when job.py is stopped, no wait for a simulator that would go on
                process.kill()
            copier.join(timeout=5)  # a process that outlives the simulator may hold the pipe; job.py ends those
        return process.returncode

    def _find_server(self, simulator: subprocess.Popen, server_folder: str) -> None:
        """Note the pid of the simulator's child that has the server's log open: NVFlare's server process."""
        log = os.path.join(server_folder, "log.txt")
        while self.server_pid is None and simulator.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(simulator.pid).children():
                    if any(f.path == log for f in child.open_files()):
                        self.server_pid = child.pid
            time.sleep(1)

    def _copy(self, stream, log) -> None:
        try:
            for line in stream:
                log.write(line)
                if not self.quiet or LOUD.search(line):
                    sys.stderr.write(line)
        except ValueError:  # the log was closed: the simulator has ended, and what is still writing is being ended
            pass


# Run as a script, and in a child that multiprocessing spawns, which imports the main script as __mp_main__: the
# simulator's processes get the fix wherever they start.
if __name__ in ("__main__", "__mp_main__"):
    try:
        patch_simulator()
    except SimulatorChanged as e:
        sys.exit(f"ERROR: {e}")
    if __name__ == "__main__":
        runpy.run_module("nvflare.private.fed.app.simulator.simulator", run_name="__main__", alter_sys=False)
