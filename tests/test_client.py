import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from client import choose_backend, parse_args, round_lr, sharded, train, warm_up
from conftest import ROOT, venv_env
from model import Net


def test_nccl_on_own_gpu_when_every_rank_has_one():
    assert choose_backend(gpus=4, local_rank=2, local_world_size=4) == ("nccl", torch.device("cuda", 2), None)
    # A site on 2 nodes of 8 GPUs: global rank 11 is local rank 3 on the second node, and takes that node's GPU 3.
    assert choose_backend(gpus=8, local_rank=3, local_world_size=8) == ("nccl", torch.device("cuda", 3), None)


def test_gloo_on_cpu_without_gpus():
    backend, device, why = choose_backend(gpus=0, local_rank=1, local_world_size=2)
    assert (backend, device.type) == ("gloo", "cpu") and "no CUDA device" in why


def test_gloo_on_cpu_when_ranks_outnumber_gpus_says_how_to_fix():
    backend, device, why = choose_backend(gpus=1, local_rank=0, local_world_size=2)
    assert (backend, device.type) == ("gloo", "cpu") and "--nproc_per_node to 1" in why


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch_size", "0"],
        ["--epochs", "-1"],
        ["--lr", "0"],
        ["--lr", "abc"],
        ["--momentum", "-0.1"],
        ["--max_grad_norm", "-1"],
        ["--warmup_rounds", "0"],
        ["--site", "site-9"],
    ],
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        parse_args(["--site", "site-1", "--sites", "site-1,site-2", *bad])
    assert e.value.code == 2


def test_trainer_under_torchrun_names_prepare_data_when_data_is_missing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--log-dir=/dev/null",
            os.path.join(ROOT, "client.py"),
            "--data_root",
            str(tmp_path),
            "--site",
            "site-1",
            "--sites",
            "site-1",
        ],
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"site-1 rank {rank}: ERROR: no CIFAR-10 in {tmp_path}" in result.stderr
    assert "run: bash prepare_data.sh" in result.stderr


def test_warm_up_ramps_the_learning_rate_over_the_first_rounds():
    assert [round_lr(0.2, r, warmup_rounds=2) for r in range(4)] == [0.1, 0.2, 0.2, 0.2]
    assert [round_lr(0.3, r, warmup_rounds=3) for r in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert round_lr(0.2, 0, warmup_rounds=1) == 0.2  # 1: no warm-up


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_each_step_is_clipped_to_max_grad_norm(one_rank_group, max_grad_norm):
    # One step of plain SGD (no momentum) moves the weights by lr times the (clipped) gradient.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    net = Net(seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    settings = {"epochs": 1, "batch_size": 64, "lr": 0.5, "momentum": 0.0, "seed": 0, "first_epoch": 0, "augment": True}
    train(DDP(net), images, labels, max_grad_norm=max_grad_norm, **settings)  # one batch: one step
    moved = (torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm().item()
    if max_grad_norm:
        assert moved == pytest.approx(0.5 * max_grad_norm, rel=1e-3)
    else:
        assert moved > 0.5 * 0.1  # the unclipped gradient of a fresh Net is far larger than 1e-3


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_warm_up_leaves_the_weights_as_they_were(one_rank_group, parallel):
    # It trains a step before the first task; what the site then receives and sends must not depend on it.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (128,), generator=g)
    net = Net(seed=0)
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    trainer = DDP(net) if parallel == "ddp" else sharded(net)
    warm_up(trainer, net, images, labels, images, labels, parse_args(["--site", "site-1", "--sites", "site-1"]))
    after = {name: getattr(t, "full_tensor", lambda t=t: t)() for name, t in net.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in net.parameters())


ORPHAN = """
import ctypes, os, sys, time
sys.path.insert(0, sys.argv[1])
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: this process stands for job.py's watchdog
if os.fork() == 0:  # torchrun
    if os.fork() == 0:  # its rank, whose torchrun dies before the rank asks to die with it
        import rank_exit
        torchrun = os.getppid()
        os.kill(torchrun, 9)
        while os.getppid() == torchrun:
            time.sleep(0.01)
        try:
            rank_exit.die_with_parent(torchrun)
        except SystemExit:
            os._exit(3)  # it saw that its torchrun is gone
        os._exit(0)  # still alive: an orphan
    time.sleep(60)
    os._exit(0)
codes = [os.waitstatus_to_exitcode(os.waitpid(-1, 0)[1]) for _ in range(2)]
print(sorted(codes))
"""


def test_a_rank_whose_torchrun_died_first_ends_under_a_subreaper_too():
    # Its new parent is the subreaper, not pid 1: the rank must still see that its torchrun is gone.
    result = subprocess.run([sys.executable, "-c", ORPHAN, ROOT], capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[0] == "[-9, 3]", result.stdout + result.stderr[-2000:]


def test_a_ranks_line_reaches_the_shared_output_in_one_write():
    # The ranks of a site write to one pipe, unbuffered: a line written in two parts (print's text, then its newline)
    # let two ranks' lines interleave in the site's log ("...CUDA_VISIBLE_DEVICES=0,1site-1 rank 1: ...").
    from rank_exit import say

    class Pipe:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    pipe = Pipe()
    say("site-1 rank 0: cpu; CUDA_VISIBLE_DEVICES=0,1", pipe)
    assert pipe.writes == ["site-1 rank 0: cpu; CUDA_VISIBLE_DEVICES=0,1\n"]
