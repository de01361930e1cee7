import contextlib
import dataclasses
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.slow_link import UNSHARE  # noqa: E402
from data import load_cifar10, normalize  # noqa: E402
from job import JOB_NAME  # noqa: E402
from local_run.results import log_times, metric, read_rounds  # noqa: E402
from local_run.runner import poc_project  # noqa: E402
from protocol import TRAINING_FLAGS  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: a real run of job.py or of NVFlare's CLI (the full tier; `-m 'not e2e'` leaves them out)"
    )


def pytest_report_header(config):
    if not ISOLATED:
        why = (
            "DDP_EXAMPLE_SHARED_NETWORK is set" if os.environ.get("DDP_EXAMPLE_SHARED_NETWORK") else "not allowed here"
        )
        return (
            f"network: no namespaces (`{' '.join(UNSHARE)} --net`: {why}); the real runs share this machine's "
            "network, each on free ports"
        )
    return None


def pytest_collection_modifyitems(items):
    """The real runs first, and of those first the groups that one worker runs whole (a POC or a run that several
    tests read); the quick tests last: the workers that pytest-xdist feeds in this order end together, the quick
    tests filling the gaps, and no long group starts near the end."""
    items.sort(key=lambda item: [item.get_closest_marker(name) is None for name in ("e2e", "xdist_group")])


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")
# Every real run gets a network of its own, a namespace with nothing but loopback: the ports it listens on never meet
# another test's, nor those of another copy of the suite, nor another program's (UNSHARE: as root or as a normal
# user, benchmarks/slow_link.py). LOOPBACK_UP raises loopback, which a new namespace starts without, and runs the rest
# of its command line (no `ip` needed: a GPU machine may lack it).
LOOPBACK_UP = [sys.executable, "-c", "import fcntl, os, socket, struct, sys; fcntl.ioctl(socket.socket(), 0x8914, "
               "struct.pack('16sH', b'lo', 0x41)); os.execvp(sys.argv[1], sys.argv[1:])"]  # fmt: skip
# Where the kernel allows no unprivileged user namespaces (some distributions' default), the real runs share the
# machine's network instead, and every port they listen on is a free one (free_ports, and --env poc's own).
# DDP_EXAMPLE_SHARED_NETWORK=1 makes a machine that allows them run the tests that way too.
ISOLATED = (
    not os.environ.get("DDP_EXAMPLE_SHARED_NETWORK")
    and subprocess.run([*UNSHARE, "--net", "true"], capture_output=True).returncode == 0
)
OWN_NETWORK = [*UNSHARE, "--net", *LOOPBACK_UP] if ISOLATED else []
POC_PROJECT = os.path.join("example_project", "prod_00")  # in a POC workspace: a folder per participant


INJECT_FAULT = os.path.join(ROOT, "tests", "inject_fault")  # sitecustomize.py: DDP_EXAMPLE_FAULT, _TRANSFER_FAILS


def venv_env(gpus: bool = False, **extra) -> dict:
    """The environment a user has after activating the venv: its bin first on PATH.

    The processes a test starts see no GPU unless it asks for them: the tests of the CPU path make
    that path happen on any machine, with or without GPUs. With DDP_EXAMPLE_FAULT, the trainers
    fail on cue, and with DDP_EXAMPLE_TRANSFER_FAILS, NVFlare's downloads (tests/inject_fault)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    if env.get("DDP_EXAMPLE_FAULT") or env.get("DDP_EXAMPLE_TRANSFER_FAILS"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [INJECT_FAULT, env.get("PYTHONPATH")]))
    return env


def job_command(*args, net: list[str] | None = None, folder: str = ROOT) -> list[str]:
    """`python job.py ARGS` (folder's job.py: this project's, or a copy) in a network of its own, or in `net` (a
    Poc's)."""
    return [*(net or OWN_NETWORK), sys.executable, os.path.join(folder, "job.py"), *args]


def run_job(*args, timeout=600, gpus=False, net=None, **env) -> subprocess.CompletedProcess:
    """The real `python job.py ARGS`, as a user runs it from this folder (on the CPU unless gpus=True), in a network
    of its own (or in `net`)."""
    return subprocess.run(
        job_command(*args, net=net),
        cwd=ROOT,
        env=venv_env(gpus, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_at_once(
    jobs: dict[str, list[str]], timeout=600, project: str = ROOT
) -> dict[str, subprocess.CompletedProcess]:
    """The real `python job.py ARGS` (project's job.py) for each name's ARGS, all started at once in one network of
    their own, as a user may start them side by side: each name's finished process."""
    running = {}
    with network_namespace() as net:
        try:
            for name, args in jobs.items():
                running[name] = subprocess.Popen(job_command(*args, net=net, folder=project), cwd=project,
                                                 env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True)  # fmt: skip
            done = {}
            for name, job in running.items():
                stdout, stderr = job.communicate(timeout=timeout)
                done[name] = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
            return done
        finally:
            for job in running.values():
                job.kill()


def nvflare(*args, timeout=300, cwd=None, net=(), **env) -> subprocess.CompletedProcess:
    """The real `nvflare ARGS` CLI (in the network `net`, if given)."""
    return subprocess.run(
        [*net, NVFLARE, *args], env=venv_env(**env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def own_poc(folder) -> dict[str, str]:
    """The environment that gives `job.py --env poc` a POC workspace of its own, folder/poc. NVFlare keeps the job
    store of a POC outside its default workspace in that workspace too, so no job outlives the test."""
    return {"NVFLARE_POC_WORKSPACE": os.path.join(str(folder), "poc")}


def kill(processes: list[str]) -> None:
    """SIGKILL each of processes_of()'s lines."""
    for line in processes:
        with contextlib.suppress(ProcessLookupError):  # it may have ended since
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def end_poc(workspace: str) -> None:
    """What a failed test leaves of a POC: every process of it killed, its workspace deleted."""
    kill(processes_of(workspace))
    shutil.rmtree(workspace, ignore_errors=True)


@dataclasses.dataclass
class Poc:
    """A running POC system of a test's own: its workspace (which holds its job store) and its network."""

    workspace: str
    net: list[str]  # the prefix that runs a command in the POC's network

    @property
    def project(self) -> str:
        return os.path.join(self.workspace, POC_PROJECT)

    @property
    def kit(self) -> str:
        return os.path.join(self.project, "admin@nvidia.com")

    def nvflare(self, *args, **kwargs) -> subprocess.CompletedProcess:
        # A home of its own too: `nvflare poc prepare` enters the POC's admin kit in ~/.nvflare/config.conf, and
        # refuses to when another POC's kit of the same name is there.
        home = os.path.join(os.path.dirname(self.workspace), "home")
        return nvflare(*args, net=self.net, NVFLARE_POC_WORKSPACE=self.workspace, HOME=home, **kwargs)


@contextlib.contextmanager
def network_namespace():
    """A network namespace with nothing but loopback, for the several commands of one run (a POC and the CLI calls to
    it, two jobs side by side), held open by a process that waits in it; yields the prefix that runs a command in
    it (nothing where the machine's network is shared)."""
    if not ISOLATED:
        yield []
        return
    holder = subprocess.Popen(
        [*OWN_NETWORK, sys.executable, "-c", "import signal; print('up', flush=True); signal.pause()"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "up\n", "no network namespace could be made"
        user = ["--user", "--preserve-credentials"] if os.geteuid() else []  # setgroups is denied in a user namespace
        yield ["nsenter", f"--target={holder.pid}", *user, "--net"]
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def poc_system(folder, env_of: dict[str, dict] | None = None):
    """A POC system of a server and site-1, site-2 in `folder`, started with the CLI as a user would: each
    participant with `nvflare poc start -p NAME` and its own environment (env_of[NAME], if any). Stopped and cleaned
    whatever happens; yields the Poc."""
    with network_namespace() as net:
        poc = Poc(os.path.join(str(folder), "poc"), net)
        # NVFlare's sample project with free ports, as --env poc prepares its own: no fixed port is shared.
        project = poc_project(["site-1", "site-2"], str(folder))
        prepared = poc.nvflare("poc", "prepare", "-i", project, "--force", cwd=folder, timeout=120)
        assert prepared.returncode == 0, prepared.stderr
        try:
            for name in ("server", "site-1", "site-2"):
                # --no-wait: on a busy machine, the CLI's own wait for the site to register was seen to hang in
                # its admin session past 120 s. The server's log says when both sites have registered.
                started = poc.nvflare(
                    "poc", "start", "-p", name, "--no-wait", cwd=folder, timeout=120, **(env_of or {}).get(name, {})
                )
                assert started.returncode == 0, started.stdout + started.stderr
            server_log = os.path.join(poc.project, "server", "log.txt")
            wait_for_log_lines(server_log, "Client: New client site-", 2, timeout=120)
            deadline = time.monotonic() + 120
            while poc.nvflare("job", "list", "--startup-kit", poc.kit, timeout=60).returncode != 0:
                assert time.monotonic() < deadline, "the POC server did not come up within 120 s"
                time.sleep(3)
            yield poc
        finally:
            poc.nvflare("poc", "stop", cwd=folder, timeout=120)
            left = processes_left(poc.workspace)
            kill(left)  # do not leave them running, whatever the test asserts
            cleaned = poc.nvflare("poc", "clean", cwd=folder, timeout=60)
    assert left == [], "POC processes outlived `nvflare poc stop`"
    assert not os.path.exists(poc.workspace), cleaned.stdout + cleaned.stderr


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive ports that nothing listens on now (a site N's --master_port is the first's +
    N - 1); in a network of the test's own they are free anyway, and on a shared one another program's are left."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("", 0))
            first = probe.getsockname()[1]
        if first + count <= 65000 and all(_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def processes_of(path: str) -> list[str]:
    """Live processes that belong to a run: their command line names `path`, or they work inside it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and (path in cmdline or cwd.startswith(path)):
            found.append(f"{pid}: {cmdline}")
    return found


def processes_left(path: str, grace: float = 30.0) -> list[str]:
    """processes_of(path), after giving stragglers `grace` seconds to exit."""
    deadline = time.monotonic() + grace
    while processes_of(path) and time.monotonic() < deadline:
        time.sleep(1)
    return processes_of(path)


class WritesMarker:
    """Pickled, it makes the unpickler create the file `marker`: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def wait_for_log_lines(path: str, text: str, count: int, timeout: float) -> None:
    """Wait until `count` timestamped lines of the log at `path` (any that matches the glob) hold `text`."""
    deadline = time.monotonic() + timeout
    while sum(len(log_times(p, text)) for p in glob.glob(path)) < count:
        assert time.monotonic() < deadline, f"no {count} '{text}' lines in {path}"
        time.sleep(0.2)


def round_metrics(workspace: str) -> list[dict]:
    """round_metrics.jsonl of a simulator run under `workspace`."""
    return read_rounds(os.path.join(workspace, JOB_NAME, "server", "simulate_job"))


def assert_learns(rounds: list[dict]) -> None:
    """Global accuracy climbs well above chance (0.1) over the rounds."""
    first, last = (metric(r["aggregated_metrics"], "accuracy") for r in (rounds[0], rounds[-1]))
    assert last > 0.5 and last > first + 0.3, (first, last)


def accuracy_as_the_sites_measure(model, data_root: str, ranks: int) -> float:
    """The test accuracy of `model`, counted over the same per-rank slices as client.evaluate."""
    _, _, test_x, test_y = load_cifar10(data_root)
    torch.set_num_threads(1)  # like each rank
    with torch.no_grad():
        correct = sum(
            int((model(normalize(test_x[r::ranks])).argmax(1) == test_y[r::ranks]).sum()) for r in range(ranks)
        )
    return correct / len(test_y)


def site_weight(shard: int) -> int:
    """The FedAvg weight a site reports for a round: the samples it trained, every sample of its shard in every
    local epoch (at the defaults), however many ranks it has."""
    return TRAINING_FLAGS["epochs"]["default"] * shard


def assert_clean(workspace: str) -> None:
    """What a successful run leaves: no traceback or error in any log, and no process."""
    logs = [
        p for p in glob.glob(os.path.join(workspace, "**", "*.txt"), recursive=True) if "log" in os.path.basename(p)
    ]
    assert logs
    for path in logs:
        with open(path) as f:
            log = f.read()
        assert "Traceback" not in log and " - ERROR - " not in log and "ERROR:" not in log, path
        assert "terminate called" not in log, path  # a rank that aborted while exiting
    assert processes_of(workspace) == []


def prepared_root(tmp_path_factory, flag: str) -> str:
    """A data root holding a synthetic stand-in, written by the real `prepare_data.sh FLAG`."""
    root = str(tmp_path_factory.mktemp("data"))
    subprocess.run(
        ["bash", os.path.join(ROOT, "prepare_data.sh"), flag],
        env=venv_env(DATA_ROOT=root),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return root


@pytest.fixture(autouse=True)
def environment_kept():
    """What a test changes in this process's environment goes with it: building the job in process sets NVFlare's
    streaming settings there (streaming.py), which would otherwise reach every later test's processes."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    return prepared_root(tmp_path_factory, "--synthetic")


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> str:
    return prepared_root(tmp_path_factory, "--synthetic-small")
