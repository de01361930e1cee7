"""For tests: makes a rank of the trainer fail on cue, from outside client.py (the shipped trainer reads no switch).

With this folder on PYTHONPATH (conftest.venv_env puts it there whenever a test sets DDP_EXAMPLE_FAULT), a process
that runs client.py imports it as a module, wraps its warm_up, flare_ddp.tasks and Task.send, and then runs its main().

DDP_EXAMPLE_FAULT=SITE:RANK:PHASE:KIND, several comma-separated. That rank fails when it reaches PHASE: `start` (after
its warm-up, before the handshake), a round number (when that round's task arrives), `send` (as round 1's result is
sent: under FSDP, while the other ranks gather the full weights), or `eval` (the final evaluation). KIND: kill
(SIGKILL the rank), raise (an exception), stop (SIGSTOP the rank: it hangs) or kill_torchrun (SIGKILL the site's
torchrun).

DDP_EXAMPLE_TRANSFER_FAILS=download or upload: NVFlare's tensor downloads give up (every request times out at once,
as over a link too slow for its per-request timeout, and after its retries it gives up) in the trainers (download: the
task's weights) or in the simulator's server (upload: the trainers' results), and nowhere else. late_download: as
download, and each site's client forgets a task it sent its trainer as soon as it went, as NVFlare 2.9 does 300 s
after (the error context of byte_streamer's stream): the trainer's failure comes too late to be heard, as that of a
download that fails minutes into a slow link."""

import os
import signal
import sys

FAULTS = [spec.split(":") for spec in os.environ.get("DDP_EXAMPLE_FAULT", "").split(",") if spec]
SCRIPT = sys.argv[0] if sys.argv else ""


def inject(site: str, rank: int, phase: str) -> None:
    kind = next((k for s, r, p, k in FAULTS if (s, int(r), p) == (site, rank, phase)), None)
    if kind is None:
        return
    print(f"{site} rank {rank}: injecting fault '{kind}' at {phase}", flush=True)
    if kind == "raise":
        raise RuntimeError("injected fault")
    signals = {
        "kill": (os.getpid(), signal.SIGKILL),
        "stop": (os.getpid(), signal.SIGSTOP),
        "kill_torchrun": (os.getppid(), signal.SIGKILL),
    }
    os.kill(*signals[kind])


def run_client_with_faults() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(SCRIPT)))
    import torch.distributed as dist

    import client

    site = client.parse_args(sys.argv[1:]).site
    warm_up, tasks, send = client.warm_up, client.flare_ddp.tasks, client.flare_ddp.Task.send

    def warm_up_then_fail(*args, **kwargs):
        warm_up(*args, **kwargs)
        inject(site, dist.get_rank(), "start")

    def tasks_then_fail(*args, **kwargs):
        for task in tasks(*args, **kwargs):
            if task.kind != client.flare_ddp.SUBMIT_MODEL:
                inject(site, dist.get_rank(), "eval" if task.kind == client.flare_ddp.VALIDATE else str(task.round))
            yield task

    def fail_then_send(task, *args, **kwargs):
        if task.kind == client.flare_ddp.TRAIN and task.round == 1:
            inject(site, dist.get_rank(), "send")
        send(task, *args, **kwargs)

    client.warm_up, client.flare_ddp.tasks, client.flare_ddp.Task.send = (
        warm_up_then_fail,
        tasks_then_fail,
        fail_then_send,
    )
    client.main()


TRANSFER = os.environ.get("DDP_EXAMPLE_TRANSFER_FAILS")
if TRANSFER:  # only the processes that download keep it: each trainer, or the simulator's server (and its forks)
    timeout = "NVFLARE_TENSOR_STREAMING_PER_REQUEST_TIMEOUT"
    if os.path.basename(SCRIPT) == ("race_free_simulator.py" if TRANSFER == "upload" else "client.py"):
        os.environ[timeout] = "0.000001"
    else:
        os.environ.pop(timeout, None)
    if TRANSFER == "late_download" and "nvflare.private.fed.app.simulator.simulator_worker" in sys.orig_argv:
        from nvflare.fuel.f3.streaming import byte_streamer

        byte_streamer.STREAM_ERROR_CONTEXT_TTL = 0

if FAULTS and os.path.basename(SCRIPT) == "client.py":
    run_client_with_faults()
