"""How a rank of client.py ends: with its torchrun, never waiting on a peer or on NVFlare's threads, and with one
line that names the cause (protocol.rank_line), which job.py reads back from the site's log."""

import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch.distributed as dist
from nvflare.client.cell.attach_session import TrainerSessionError

from data import DataError
from protocol import ERROR, PEER_LOST, STOPPING, rank_line

# How gloo reports a peer that did not answer within the process group's timeout (torch 2.14). NCCL's
# watchdog aborts the rank itself instead.
PEER_STALLED = "Timed out waiting"


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this rank if its torchrun (`parent`, read before) dies, so no orphan waits in a
    collective. A parent already gone by then is not pid 1 under a subreaper or in a container: compare pids."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent was already gone
            sys.exit(1)


def say(line: str, stream=sys.stdout) -> None:
    """Print one line in one write. The ranks of a site share their torchrun's output, and their interpreters run
    unbuffered (`python -u`): print() writes the text and its newline apart, so two ranks' lines could interleave."""
    stream.write(f"{line}\n")
    stream.flush()


def leave(code: int, message: str = "") -> NoReturn:
    """End this rank now, without the interpreter's teardown.

    A failed rank must not wait in a collective or on NVFlare's threads. A finished rank must not
    tear down either: gloo's worker threads can still be releasing tensors then, and a thread that
    takes the GIL during teardown aborts the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489)."""
    if message:
        say(message, sys.stderr)
    sys.stdout.flush()
    os._exit(code)


@contextmanager
def failures_end_the_rank(site: str, stall_timeout: float) -> Iterator[None]:
    """Any failure inside ends this rank at once, with a line that says why: exit code 2 for bad data, 1 else."""
    try:
        yield
    except DataError as e:
        leave(2, rank_line(site, dist.get_rank(), ERROR, str(e)))
    except TrainerSessionError as e:  # the server ended the job, usually because another site failed
        leave(1, rank_line(site, dist.get_rank(), STOPPING, str(e)))
    except Exception as e:
        traceback.print_exc()
        stalled, lost = PEER_STALLED in str(e), any(sign in str(e) for sign in PEER_LOST)
        why = f"{type(e).__name__}: {e}"
        if stalled:
            why = f"a peer rank did not answer within --stall_timeout {stall_timeout:g} s: it is stuck or stopped"
        elif lost and dist.get_world_size() > int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
            # This node's torchrun names a rank of its own that failed; one on another node reports over there.
            why = f"a peer rank went away ({why}); if no rank of this node failed, see the other nodes' output"
        say(rank_line(site, dist.get_rank(), ERROR, why), sys.stderr)
        if stalled and "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun would wait 30 s for a stopped rank to obey SIGTERM, twice; its end kills every rank now.
            os.kill(os.getppid(), signal.SIGKILL)
        if lost:
            # Another rank died first: give torchrun a moment to see that one and name it as the cause.
            time.sleep(5)
        leave(1)
