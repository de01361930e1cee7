"""flare_ddp's own collectives and its tasks, on real gloo ranks under torchrun (no NVFlare server needed)."""

import os
import subprocess
import sys

import pytest

from conftest import OWN_NETWORK, ROOT, venv_env

TRANSFORMER_SITE = os.path.join(ROOT, "tests", "transformer_site")

# Rank 0's tensors of mixed dtypes and sizes, the others' zeros: after _broadcast every rank holds rank 0's, in
# place (the same tensor objects), and a tensor above the bucket size went alone.
BROADCAST = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import flare_ddp

dist.init_process_group("gloo")
g = torch.Generator().manual_seed(0)
shapes = [(3, 5)] * 50 + [(flare_ddp.BUCKET_BYTES // 4 + 1,), (7,), (2, 2)]
dtypes = [torch.float32, torch.bfloat16, torch.int64]
expected = [torch.randn(s, generator=g).to(dtypes[i % 3]) for i, s in enumerate(shapes)]
mine = [t.clone() if dist.get_rank() == 0 else torch.zeros_like(t) for t in expected]
objects = [id(t) for t in mine]
flare_ddp._broadcast(mine)
assert [id(t) for t in mine] == objects
assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(mine, expected))
print(f"rank {dist.get_rank()}: all {len(mine)} tensors match", flush=True)
dist.destroy_process_group()
"""


def test_broadcast_in_buckets_gives_every_rank_rank_0s_tensors_in_place(tmp_path):
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST)
    result = subprocess.run(
        [*OWN_NETWORK, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--log-dir", "/dev/null", str(script), ROOT],
        env=venv_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: all 53 tensors match" in result.stdout


def test_a_task_must_make_up_the_model_with_the_sites_kept_copies(monkeypatch):
    import torch

    import flare_ddp

    monkeypatch.setattr(flare_ddp, "_received", set())
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # names 0.weight, 0.bias, 1.*
    full = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="left out '0.weight' as this site's own copy, but this trainer was never"):
        flare_ddp._check_complete(model, {"1.weight": full["1.weight"]}, ["0.weight"])  # a trainer started anew
    flare_ddp._check_complete(model, full, [])  # the first task: everything
    flare_ddp._check_complete(model, {"1.weight": full["1.weight"]}, ["0.weight", "0.bias", "1.bias"])
    with pytest.raises(RuntimeError, match="the server's weights lack '1.bias' of this site's model, and it has no"):
        flare_ddp._check_complete(model, {"1.weight": full["1.weight"]}, ["0.weight", "0.bias"])
    with pytest.raises(RuntimeError, match="the server sent '2.weight', which this site's model does not have"):
        flare_ddp._check_complete(model, {**full, "2.weight": full["1.weight"]}, [])


def test_a_frozen_tied_embedding_kept_at_the_site_keeps_its_tied_head_too(monkeypatch):
    import torch

    import flare_ddp

    monkeypatch.syspath_prepend(TRANSFORMER_SITE)
    from my_transformer import TinyLM

    monkeypatch.setattr(flare_ddp, "_received", set())
    monkeypatch.setattr(flare_ddp.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(flare_ddp.dist, "broadcast_object_list", lambda objects, src, group: None)
    monkeypatch.setattr(flare_ddp, "_broadcast", lambda tensors: None)
    model, server = TinyLM(seed=0), TinyLM(seed=1).state_dict()
    flare_ddp._load(model, {k: v for k, v in server.items() if k != "head.weight"}, None)  # round 0: all, tied once
    trained = {k: v + 1 for k, v in server.items() if k.startswith("blocks.")}
    flare_ddp._load(model, trained, [k for k in server if not k.startswith("blocks.") and k != "head.weight"])
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, server["embed.weight"])
    assert torch.equal(model.blocks[0].norm1.weight, trained["blocks.0.norm1.weight"])


def test_the_bridge_loads_and_sends_a_tied_transformer_whatever_state_a_forward_left(tmp_path):
    # tests/transformer_site/bridge_on_ranks.py: TinyLM (embeddings, final norm and a tied head at the root) on 4
    # ranks under DDP, FSDP2 (each block, then the root) and hybrid FSDP2 on 2 x 2 ranks, in turn. Each task comes
    # after a forward with no backward; the weights load into the same parameter objects, the tie holds, an
    # optimizer built before the task and one built after the evaluation both step every parameter, and what is
    # sent is the full model.
    modes = ["ddp", "fsdp", "hsdp"]
    result = subprocess.run(
        [*OWN_NETWORK, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
         "--log-dir", "/dev/null", os.path.join(TRANSFORMER_SITE, "bridge_on_ranks.py"), *modes],
        env=venv_env(PYTHONPATH=os.pathsep.join([ROOT, TRANSFORMER_SITE])), capture_output=True, text=True,
        timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for mode in modes:
        for rank in range(4):
            assert f"{mode} rank {rank}: every check holds" in result.stdout
