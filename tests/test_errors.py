"""Bad plans and inputs raise a clear error on every rank, before any collective runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.debug import CommDebugMode

from models import MLP, Encoder, OddMLP
from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    RowwiseParallel,
    make_output_tensor,
    parallelize_module,
)
from shardwise.testing import check_parity, expect_raises, mesh_of


def _plan_errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    with CommDebugMode() as comms:
        msgs.append(expect_raises(RuntimeError, parallelize_module, OddMLP(8), mesh,
                                  PairwiseParallel(), match="odd"))
        msgs.append(expect_raises(RuntimeError, parallelize_module, nn.LayerNorm(8), mesh,
                                  ColwiseParallel(), match="Linear"))
        msgs.append(expect_raises(RuntimeError, parallelize_module, nn.LayerNorm(8), mesh,
                                  PairwiseParallel(), match="nothing to parallelize"))
        msgs.append(expect_raises(AttributeError, parallelize_module, MLP(), mesh,
                                  {"net3": ColwiseParallel()}, match="`net3`"))
        msgs.append(expect_raises(AttributeError, parallelize_module, Encoder(), mesh,
                                  {"blocks.*.fc9": ColwiseParallel()}, match="`fc9`"))
        for bad in (None, "pairwise", [ColwiseParallel()], 3, PairwiseParallel):
            msgs.append(expect_raises(RuntimeError, parallelize_module, MLP(), mesh, bad,
                                      match="parallelize_plan"))
        msgs.append(expect_raises(RuntimeError, parallelize_module, MLP(), mesh,
                                  {"net1": "colwise"}, match="parallelize_plan"))
        msgs.append(expect_raises(ValueError, parallelize_module, MLP(), mesh, PairwiseParallel(),
                                  tp_mesh_dim=1, match="tp_mesh_dim"))
        msgs.append(expect_raises(ValueError, parallelize_module, MLP(), mesh,
                                  {"net1": ColwiseParallel(), "": PairwiseParallel()},
                                  match="two plan entries"))
        if world == 4:
            # Uneven splits work (see _uneven_parity); fewer features than ranks cannot.
            msgs.append(expect_raises(ValueError, parallelize_module, nn.Linear(8, 3), mesh,
                                      ColwiseParallel(), match="out_features=3 over 4 ranks"))
            msgs.append(expect_raises(ValueError, parallelize_module, nn.Linear(3, 8), mesh,
                                      RowwiseParallel(), match="in_features=3 over 4 ranks"))
            msgs.append(expect_raises(ValueError, parallelize_module, MLP(16, 3), mesh,
                                      PairwiseParallel(), match="net1.*out_features=3"))
            msgs.append(expect_raises(ValueError, parallelize_module, MLP(), mesh_of(2, 2),
                                      PairwiseParallel(), tp_mesh_dim=2, match="tp_mesh_dim"))
            msgs.append(expect_raises(ValueError, parallelize_module, MLP(), mesh_of(2, 2),
                                      PairwiseParallel(), tp_mesh_dim=-3, match="tp_mesh_dim"))
        # A valid entry followed by an invalid one: nothing is applied, nothing communicated.
        m = MLP(16, 32)
        msgs.append(expect_raises(RuntimeError, parallelize_module, m, mesh,
                                  {"net1": ColwiseParallel(), "relu": RowwiseParallel()},
                                  match="Linear"))
        assert not isinstance(m.net1.weight, DTensor)
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


def _uneven_parity(world: int) -> list[dict]:
    """What used to be "not divisible" errors: torch.chunk splits (2, 2, 2, 0 on 4 ranks)."""
    mesh = mesh_of(world)
    def x(dim: int) -> Callable[[int], torch.Tensor]:
        return lambda step: torch.randn(3, dim)

    reports = [
        check_parity(lambda: nn.Linear(8, 6), ColwiseParallel(_prepare_output=make_output_tensor),
                     mesh, x(8)),
        check_parity(lambda: nn.Linear(6, 8), RowwiseParallel(input_layouts=Replicate()), mesh, x(6)),
        check_parity(lambda: MLP(16, 6), PairwiseParallel(), mesh, x(16)),
    ]
    return [vars(r) for r in reports]


def _already_parallel(world: int) -> str:
    mesh = mesh_of(world)
    m = parallelize_module(MLP(), mesh, PairwiseParallel())
    return expect_raises(RuntimeError, parallelize_module, m, mesh, PairwiseParallel(),
                         match="already parallelized")


def _rank_not_in_mesh(world: int) -> str | None:
    mesh = DeviceMesh("cpu", [0, 1])
    if dist.get_rank() < 2:
        return None
    return expect_raises(ValueError, parallelize_module, MLP(), mesh, PairwiseParallel(),
                         match="not part of the device mesh")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_plan_errors_raise_on_every_rank(pools, world):
    results = pools(world).run(_plan_errors, world, timeout=30)
    assert len(results) == world
    assert all(len(r) == len(results[0]) >= 13 for r in results)
    assert len({tuple(r) for r in results}) == 1  # the same messages on every rank


def test_uneven_features_are_split_like_torch_chunk(pools):
    for reports in pools(4).run(_uneven_parity, 4):
        assert [r["steps"] for r in reports] == [3, 3, 3]


@pytest.mark.parametrize("world", [2])
def test_reparallelizing_is_an_error(pools, world):
    assert all("already" in m for m in pools(world).run(_already_parallel, world, timeout=30))


def test_rank_outside_mesh(pools):
    results = pools(4).run(_rank_not_in_mesh, 4, timeout=30)
    assert results[:2] == [None, None] and all("rank" in m for m in results[2:])


def test_parallelize_needs_distributed_or_a_mesh():
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallelize_module(MLP(), PairwiseParallel())
    with pytest.raises(TypeError, match="DeviceMesh"):
        parallelize_module(MLP(), "cpu", PairwiseParallel())
    with pytest.raises(TypeError, match="nn.Module"):
        parallelize_module(torch.ones(2), None, PairwiseParallel())
