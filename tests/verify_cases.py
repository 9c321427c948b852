"""Models for tests/test_verify.py and tests/test_cli.py: a correct block and four plan bugs.

Each factory returns ``(model, plan, example_inputs)``, the shape ``shardwise verify``
takes (``shardwise verify tests/verify_cases.py:good --tp 2``). The bugs are the ones
tensor-parallel users hit: each is silent at plan time and gives wrong numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise import ColwiseParallel, RowwiseParallel

DIM, HEADS = 32, 4


class Attention(nn.Module):
    """Causal self-attention on ``[B, S, C]``; ``local_heads_bug`` takes head_dim from the local width."""

    def __init__(self, local_heads_bug: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.bug = local_heads_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, S, C/W] on each TP rank
        # Correct: a fixed head size, so each rank holds C/W // head_dim whole heads.
        # The bug: a fixed head count, so head_dim shrinks with the local width.
        head_dim = q.shape[-1] // HEADS if self.bug else DIM // HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, -1, head_dim).transpose(1, 2)  # [B, H_local, S, D]

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))  # [B, S, C]


class MLP(nn.Module):
    """fc1 -> activation -> fc2, with the two bugs that sit between a column and a row layer."""

    def __init__(
        self, softmax_bug: bool = False, gate_bug: bool = False, faint_gate_bug: bool = False
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)
        self.softmax_bug = softmax_bug
        # A plain scalar applied to the column-parallel activation: replicated on every
        # rank, so its gradient (a sum over the sharded features) is only a partial sum.
        # Faint: it barely changes the output, so each rank's partial gradient is within
        # tolerance of one device's; only the ranks disagree (they would train apart).
        self.gate = nn.Parameter(torch.tensor(0.7)) if gate_bug or faint_gate_bug else None
        self.gate_weight = 1e-6 if faint_gate_bug else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # [B, S, 4C/W]
        h = torch.softmax(h, dim=-1) if self.softmax_bug else F.gelu(h)
        if self.gate is not None:
            h = h * (1 + self.gate_weight * (self.gate - 1)) if self.gate_weight != 1.0 else h * self.gate
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(x))``."""

    def __init__(self, **bugs: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = Attention(bugs.pop("local_heads_bug", False))
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = MLP(**bugs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def plan() -> dict[str, Any]:
    col, row = ColwiseParallel(), RowwiseParallel()
    return {
        "attn.q": col,
        "attn.k": col,
        "attn.v": col,
        "attn.o": row,
        "mlp.fc1": col,
        "mlp.fc2": row,
    }


def inputs() -> torch.Tensor:
    return torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3))


def good() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return Block(), plan(), inputs()


def softmax_between() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return Block(softmax_bug=True), plan(), inputs()


def local_heads() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return Block(local_heads_bug=True), plan(), inputs()


def plain_gate() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return Block(gate_bug=True), plan(), inputs()


def faint_gate() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return Block(faint_gate_bug=True), plan(), inputs()
