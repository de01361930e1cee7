"""A trainer of TinyLM written as a user writes one from docs/your-own-model-and-data.md: DDP, or FSDP2 with --fsdp
(each block, then the root). It evaluates first, and builds its optimizer after that, inside the loop; with
KEEP_OPTIMIZER it builds AdamW once, before the loop, and keeps its moments from round to round."""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import flare_ddp
from my_transformer import VOCAB, TinyLM, shard

KEEP_OPTIMIZER = False
BATCH = 24  # sequences a site batch, split evenly over 2, 3 or 4 ranks

p = argparse.ArgumentParser()
for flag in ("--data_root", "--site", "--sites"):
    p.add_argument(flag)
p.add_argument("--epochs", type=int)
p.add_argument("--seed", type=int)
p.add_argument("--lr", type=float)
p.add_argument("--fsdp", action="store_true")
args, _ = p.parse_known_args()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
sites = args.sites.split(",")
train_set = torch.load(os.path.join(args.data_root, "train.pt"))[sites.index(args.site) :: len(sites)]
test_set = torch.load(os.path.join(args.data_root, "test.pt"))[rank::world]
model = TinyLM()
if args.fsdp:
    nodes = world // int(os.environ["LOCAL_WORLD_SIZE"])  # several nodes: replicate across them, shard within each
    mesh = init_device_mesh("cpu", (nodes, world // nodes), mesh_dim_names=("nodes", "ranks")) if nodes > 1 else None
    trainer = shard(model, mesh, bf16=KEEP_OPTIMIZER)
    if rank == 0:
        print(f"{args.site}: FSDP2 over {nodes} node(s) x {world // nodes} rank(s)", flush=True)
else:
    trainer = DDP(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr) if KEEP_OPTIMIZER else None


@torch.no_grad()
def evaluate() -> float:
    """Next-token accuracy where the sequence has fixed its step (from the third token on); one forward a rank."""
    model.eval()
    predicted = model(test_set)[:, 1:-1].argmax(-1)
    counts = torch.tensor([(predicted == test_set[:, 2:]).sum().item(), predicted.numel()])
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


flare_ddp.init()
for task in flare_ddp.tasks(model):
    if task.kind == flare_ddp.SUBMIT_MODEL:
        task.send(params=model.state_dict())
        continue
    accuracy = evaluate()
    if task.kind == flare_ddp.VALIDATE:
        task.send(metrics={"accuracy": accuracy})
        continue
    if not KEEP_OPTIMIZER:
        optimizer = torch.optim.SGD(trainer.parameters(), lr=args.lr, momentum=0.9)
    trainer.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(task.round * 100 + epoch))
        for first in range(0, len(order) - BATCH + 1, BATCH):
            x = train_set[order[first : first + BATCH]][rank::world]
            loss = F.cross_entropy(trainer(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    metrics = {"accuracy": accuracy, "local_accuracy": evaluate(), "train_loss": loss.item()}
    task.send(params=model.state_dict(), metrics=metrics, weight=args.epochs * len(train_set))
dist.destroy_process_group()
os._exit(0)
