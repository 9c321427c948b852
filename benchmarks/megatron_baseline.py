"""A hand-written Megatron-style GPT block: local weight shards and explicit f/g collectives.

This is the baseline shardwise is measured against. It is written the way one would by
hand (Shoeybi et al. 2019): plain ``nn.Parameter`` shards, one copy-to-region (*f*) where
the block's replicated input enters q/k/v and where it enters the MLP, and one
reduce-from-region (*g*) after each row-parallel projection. It does not use shardwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.testing.models import GPTBlock


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


class MegatronGPTBlock(nn.Module):
    """This rank's shard of :class:`GPTBlock`, built from a full block's weights."""

    def __init__(self, full: GPTBlock, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)

        def col(lin: nn.Linear) -> tuple[nn.Parameter, nn.Parameter]:
            return (
                nn.Parameter(lin.weight.detach().chunk(world, 0)[rank].clone()),
                nn.Parameter(lin.bias.detach().chunk(world, 0)[rank].clone()),
            )

        def row(lin: nn.Linear) -> tuple[nn.Parameter, nn.Parameter]:
            return (
                nn.Parameter(lin.weight.detach().chunk(world, 1)[rank].clone()),
                nn.Parameter(lin.bias.detach().clone()),
            )

        self.head_dim = full.head_dim
        self.ln1, self.ln2 = full.ln1, full.ln2
        self.wq, self.bq = col(full.q)
        self.wk, self.bk = col(full.k)
        self.wv, self.bv = col(full.v)
        self.wo, self.bo = row(full.o)
        self.wup, self.bup = col(full.up)
        self.wdown, self.bdown = row(full.down)
        self.first = rank == 0

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        s, b, _ = t.shape
        return t.view(s, b, -1, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _F.apply(self.ln1(x), self.group)
        q = self._heads(F.linear(h, self.wq, self.bq))
        k = self._heads(F.linear(h, self.wk, self.bk))
        v = self._heads(F.linear(h, self.wv, self.bv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b, _, s, _ = a.shape
        a = a.permute(2, 0, 1, 3).reshape(s, b, -1)
        x = x + _G.apply(F.linear(a, self.wo), self.group) + self.bo
        h = _F.apply(self.ln2(x), self.group)
        u = F.gelu(F.linear(h, self.wup, self.bup))
        return x + _G.apply(F.linear(u, self.wdown), self.group) + self.bdown


class MegatronStack(nn.Module):
    def __init__(self, blocks: list[MegatronGPTBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
