"""A small language model shaped like the transformers people shard: token and position embeddings, the final norm
and the output head at the root, the head tied to the token embedding, the blocks in a list, and an int64 buffer.
Its width (40) is not a multiple of 3, so 3 ranks hold shards of unequal size."""

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

VOCAB, LENGTH = 16, 8


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, seed: int = 0, width: int = 40, heads: int = 4, depth: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(LENGTH, width) * 0.1)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two names in the state dict
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps taken, counted

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.embed(tokens) + self.position[:n]
        for block in self.blocks:
            x = block(x, causal)
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return self.head(self.norm(x))


def shard(model: TinyLM, mesh=None, bf16: bool = False) -> TinyLM:
    """FSDP2 as transformer trainers apply it: each block, then the root, which keeps the embeddings, the final norm
    and the head. mesh: a 1-D mesh shards over the site's ranks (None: all of them); a 2-D (nodes, ranks a node)
    mesh replicates across nodes and shards within each (hybrid sharding)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    for block in model.blocks:
        fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


def next_token_data(n: int, seed: int) -> torch.Tensor:
    """n sequences that count up from a random token in steps of 1, 2 or 3 (mod VOCAB): after two tokens the rest
    is determined. Chance is 1 in VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(LENGTH)) % VOCAB
