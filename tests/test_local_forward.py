"""LocalForward: a module's own forward on the local shards of its parameters, equal to one device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from shardwise import ColwiseParallel, ModuleStyle, RowwiseParallel
from shardwise._engine.local_forward import LocalForward, local_parameters
from shardwise._engine.local_params import distribute_parameter
from shardwise.testing import check_parity, mesh_of


class FeatureScale(nn.Module):
    """A per-feature scale: one weight per feature of a column-sharded activation."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class HeadNorm(nn.Module):
    """An RMS norm over each head's features (Qwen3's q_norm): the weight is per head_dim."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unflatten(-1, (-1, self.head_dim))  # [..., heads (local), head_dim]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return h.flatten(-2)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.scale = FeatureScale(16)
        self.norm = HeadNorm(4)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.scale(self.up(x))))


class Local(ModuleStyle):
    """Test style: place the module's parameters and run its own forward on the shards."""

    def __init__(self, placement: Placement, sum_grads: bool = False) -> None:
        super().__init__()
        self.placement, self.sum_grads = placement, sum_grads

    def __repr__(self) -> str:
        return f"Local({self.placement}, sum_grads={self.sum_grads})"

    def apply(self, module: Any, mesh: Any) -> Any:
        distribute_parameter(module, "weight", mesh, self.placement, sum_grads=self.sum_grads)
        summed = frozenset({"weight"}) if self.sum_grads else frozenset()
        return LocalForward(mesh.get_group(), summed=summed, label=repr(self)).install(module)


PLAN = {
    "up": ColwiseParallel(),
    "scale": Local(Shard(0)),  # each rank scales its own features
    "norm": Local(Replicate(), sum_grads=True),  # every rank's heads use the whole weight
    "down": RowwiseParallel(),
}


def _parity(world: int) -> int:
    return check_parity(Model, PLAN, mesh_of(world), lambda step: torch.randn(3, 8)).grads


@pytest.mark.parametrize("world", [1, 2, 4])
def test_own_forward_on_local_shards_trains_like_one_device(pools, world):
    assert pools(world).run(_parity, world) == [3 * 6] * world


def _parameters_come_back(world: int) -> bool:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    mesh = mesh_of(world)
    module = Boom()
    distribute_parameter(module, "weight", mesh, Replicate())
    LocalForward(mesh.get_group()).install(module)
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.ones(2))
    assert isinstance(module.weight, DTensor)
    with local_parameters(module):
        assert not isinstance(module.weight, DTensor)
    return isinstance(module.weight, DTensor)


def test_parameters_come_back_whatever_the_forward_does(pools):
    assert pools(1).run(_parameters_come_back, 1) == [True]
