"""Small single-device models shared by the tests (no parallel code inside)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Two Linear layers with a ReLU: the canonical Megatron pair."""

    def __init__(self, dim: int = 16, hidden: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.net1 = nn.Linear(dim, hidden, bias=bias)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


class DeepMLP(nn.Module):
    """Four Linear layers (two pairs) with GELUs in between."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.l0 = nn.Linear(dim, 2 * dim)
        self.l1 = nn.Linear(2 * dim, dim)
        self.l2 = nn.Linear(dim, 4 * dim)
        self.l3 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = nn.functional.gelu
        return self.l3(g(self.l2(g(self.l1(g(self.l0(x)))))))


class OddMLP(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.c = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class Encoder(nn.Module):
    """An MLP nested one level down, for FQN and glob plans."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MLP(dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x
