"""Run by tests/test_flare_ddp.py under torchrun: flare_ddp's tasks, loads and sends on real gloo ranks, with TinyLM
under DDP, FSDP2 and hybrid FSDP2 (2 x 2) in turn (the modes in argv, on 4 ranks), and a stand-in for NVFlare's Client
API on rank 0 that hands out a TRAIN, a VALIDATE (its tied head left out, as the server sends it), a SUBMIT_MODEL
task, and a TRAIN task that brings one block only (the rest left out as the site's own, as server_fedavg.SendOnce
sends it) and is answered with that block, and keeps what is sent. Prints one line a rank and mode when every check
holds."""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import flare_ddp
from my_transformer import VOCAB, TinyLM, next_token_data, shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
flare_ddp._control = dist.new_group(backend="gloo")  # what flare_ddp.init() makes, without NVFlare's handshake


def run(mode: str) -> None:
    # The server's side: two sets of weights to hand out, and the results sent back.
    sent_weights = [TinyLM(seed=1).state_dict(), TinyLM(seed=2).state_dict()]
    expected = [{k: v.clone() for k, v in w.items()} for w in sent_weights]  # loading may replace the dict's values
    del sent_weights[1]["head.weight"]  # as the server sends a tied pair: once (server_fedavg.SendOnce)
    trained_prefix = "blocks.1."  # what the last TRAIN task brings and what its result holds: what the site trains
    block = {k: v for k, v in TinyLM(seed=3).state_dict().items() if k.startswith(trained_prefix)}
    expected_block = {k: v.clone() for k, v in block.items()}
    script = [
        ([1, 1, 2, 1], (sent_weights[0], None)),
        ([2, 0, 0, 1], (sent_weights[1], None)),
        ([3, 0, 0, 0], None),
        ([1, 2, 2, 1], (block, [k for k in expected[0] if not k.startswith(trained_prefix)])),
        ([0] * 4, None),
    ]
    received = []
    flare_ddp._receive = lambda: script.pop(0)
    flare_ddp.flare.send = lambda result: received.append(copy.deepcopy(result))  # as it was when sent

    model = TinyLM()
    if mode == "ddp":
        trainer = DDP(model)
    elif mode == "fsdp":
        trainer = shard(model)
    else:  # 2 "nodes": replicated across them, sharded within each
        trainer = shard(model, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("nodes", "ranks")))
    kept = torch.optim.AdamW(model.parameters(), lr=0.01)  # built once, before the first task
    parameters = [id(p) for p in model.parameters()]
    x = next_token_data(12, seed=rank)

    def full_state() -> dict:
        """A copy of the full weights, on rank 0 (a collective under FSDP)."""
        if mode == "ddp":
            full = model.state_dict()
        else:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in full.items()}

    def step(optimizer) -> None:
        trainer.train()
        loss = F.cross_entropy(trainer(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def check(condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(f"{mode} rank {rank}: {what}")

    def check_every_parameter_moved(before: dict, after: dict, by: str) -> None:
        if rank == 0:
            still = [k for k in before if before[k].is_floating_point() and torch.equal(before[k], after[k])]
            check(not still, f"{by} did not change {still}")

    before_send = {}  # round: the full weights as the site's result was sent
    evaluate()  # a forward with no backward before the first task (an evaluation, a warm-up)
    for task in flare_ddp.tasks(model):
        check(model.head.weight is model.embed.weight, f"the tie broke at the {task.kind} task")
        check([id(p) for p in model.parameters()] == parameters, "a load replaced parameter objects")
        if task.kind == flare_ddp.SUBMIT_MODEL:
            evaluate()
            task.send(params=model.state_dict())
            continue
        loaded = full_state()
        # The last TRAIN task: its block, and the rest as the site had it (the VALIDATE task's weights, as submitted).
        want = (
            {**expected[1], **expected_block} if task.round == 2 else expected[0 if task.kind == flare_ddp.TRAIN else 1]
        )
        if rank == 0:
            check(loaded.keys() == want.keys(), f"keys {sorted(loaded.keys() ^ want.keys())}")
            check(all(torch.equal(loaded[k], want[k]) for k in want), f"the {task.kind} weights were not loaded")
        evaluate()  # the received weights scored first ...
        if task.kind == flare_ddp.VALIDATE:
            task.send(metrics={"accuracy": 0.5})
            continue
        after_eval = torch.optim.SGD(trainer.parameters(), lr=0.1)  # ... and the optimizer built after that
        if mode != "ddp":
            check(all(isinstance(p, DTensor) for g in after_eval.param_groups for p in g["params"]), "plain tensors")
        step(after_eval)
        moved = full_state()
        check_every_parameter_moved(loaded, moved, "the optimizer built after an evaluation")
        step(kept)
        check_every_parameter_moved(moved, full_state(), "the optimizer built before the task")
        evaluate()  # the local model scored before it is sent
        before_send[task.round] = full_state()
        if task.round == 2:  # only what it trains
            task.send(params={k: v for k, v in model.state_dict().items() if k.startswith(trained_prefix)}, weight=3)
        else:
            task.send(params=model.state_dict(), weight=3)

    if rank == 0:
        train_result, validate_result, submitted, block_result = received
        check(train_result.params.keys() == before_send[1].keys() - {"head.weight"}, "the tied pair went twice")
        check(train_result.meta[flare_ddp.TIED] == {"head.weight": "embed.weight"}, "the tie was not sent")
        check(
            all(torch.equal(train_result.params[k], before_send[1][k]) for k in train_result.params), "the sent weights"
        )
        check(train_result.params["steps"].dtype == torch.int64 and train_result.params["steps"] > 0, "the step count")
        check(validate_result.params is None and validate_result.metrics == {"accuracy": 0.5}, "the validate result")
        check(submitted.params.keys() == expected[1].keys() - {"head.weight"}, "the submitted keys")
        check(all(torch.equal(submitted.params[k], expected[1][k]) for k in submitted.params), "the submitted model")
        check(
            block_result.params.keys() == block.keys() and flare_ddp.TIED not in block_result.meta, "the block's keys"
        )
        check(all(torch.equal(block_result.params[k], before_send[2][k]) for k in block), "the block sent")
    print(f"{mode} rank {rank}: every check holds", flush=True)


for mode in sys.argv[1:]:  # one start of torch on each rank for all of them
    run(mode)
dist.destroy_process_group()
os._exit(0)  # past gloo's threads, which can abort a normal interpreter exit
