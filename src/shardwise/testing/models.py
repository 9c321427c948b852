"""Reference models for tests and benchmarks: plain single-device PyTorch, no parallel code.

``GPTBlock`` is written the way TP-agnostic model code should be: it derives the number
of heads from the projection's output size (``view(S, B, -1, head_dim)``), so the same
code runs unsharded or with q/k/v column-sharded.

Example::

    >>> block = GPTBlock(dim=64, heads=4)
    >>> y = block(torch.randn(16, 2, 64))   # [S, B, C] -> [S, B, C]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTBlock", "GPTStack", "gpt_block_plan"]


class GPTBlock(nn.Module):
    """Pre-norm GPT block, separate q/k/v/o/up/down Linears.

    Sequence-first ``[S, B, C]`` by default; ``batch_first`` takes ``[B, S, C]`` (the
    Hugging Face layout, whose sequence shards are ``Shard(1)``).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, *, batch_first: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.head_dim = dim // heads
        self.batch_first = batch_first
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, mlp_ratio * dim)
        self.down = nn.Linear(mlp_ratio * dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        s, b, _ = t.shape
        return t.view(s, b, -1, self.head_dim).permute(1, 2, 0, 3)  # [B, H_local, S, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self._forward_batch_first(x)
        h = self.ln1(x)                                             # [S, B, C]
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H_local, S, D]
        b, _, s, _ = a.shape   # S is the full sequence even when x holds a sequence shard
        a = a.permute(2, 0, 1, 3).reshape(s, b, -1)                  # [S, B, H_local * D]
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))

    def _forward_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            b, s, _ = t.shape
            return t.view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, H_local, S, D]

        h = self.ln1(x)                                             # [B, S, C]
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H_local, S, D]
        b, _, s, _ = a.shape
        a = a.transpose(1, 2).reshape(b, s, -1)                      # [B, S, H_local * D]
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPTStack(nn.Module):
    """``depth`` GPT blocks in a ModuleList named ``blocks``."""

    def __init__(self, dim: int, heads: int, depth: int = 2, *, batch_first: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, batch_first=batch_first) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def gpt_block_plan(
    sequence_parallel: bool = False, *, batch_first: bool = False, save_gathered_input: bool = False
) -> dict[str, Any]:
    """The seed-style plan for :class:`GPTBlock`: Colwise q/k/v/up, Rowwise o/down.

    With ``sequence_parallel`` the block takes and returns sequence shards: norms run
    sequence-parallel, column layers all-gather their input, row layers reduce-scatter.
    With ``batch_first`` too, the plan is written in torch 2.x layouts on ``Shard(1)``
    (norms ``SequenceParallel()``, column ``input_layouts=Shard(1)``, row
    ``output_layouts=Shard(1)``), for a ``batch_first`` block. ``save_gathered_input``
    makes the column layers save their gathered input instead of the sequence shard.

    Example::

        >>> parallelize_module(block, mesh, gpt_block_plan(sequence_parallel=True))
    """
    from torch.distributed.tensor import Shard

    from ..layouts import make_input_reshard_replicate, make_output_reshard_tensor
    from ..styles.composite import SequenceParallel
    from ..styles.linear import ColwiseParallel, RowwiseParallel

    if sequence_parallel and batch_first:
        col = ColwiseParallel(input_layouts=Shard(1), save_gathered_input=save_gathered_input)
        row = RowwiseParallel(output_layouts=Shard(1))
        sp = SequenceParallel()
        return {"ln1": sp, "q": col, "k": col, "v": col, "o": row, "ln2": sp, "up": col, "down": row}
    if not sequence_parallel:
        col, row = ColwiseParallel(), RowwiseParallel()
        return {"q": col, "k": col, "v": col, "o": row, "up": col, "down": row}
    col = ColwiseParallel(
        _prepare_input=make_input_reshard_replicate, save_gathered_input=save_gathered_input
    )
    row = RowwiseParallel(_prepare_output=make_output_reshard_tensor)
    sp = SequenceParallel()
    return {"ln1": sp, "q": col, "k": col, "v": col, "o": row, "ln2": sp, "up": col, "down": row}
