"""Plan forms: default mesh, n-D meshes, user prepare functions (the DTensor path)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from models import MLP
from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    RowwiseParallel,
    make_input_replicate_1d,
    make_input_shard_1d,
    make_output_replicate_1d,
    make_output_tensor,
    parallelize_module,
)
from shardwise.testing import check_parity, mesh_of


def replicate_in(x, mesh):  # a user's own function: not identity-equal to the seed's
    return make_input_replicate_1d(x, mesh)


def gather_out(y, mesh):
    return make_output_tensor(y, mesh)


def _user_functions(world: int) -> dict:
    plan = {
        "net1": ColwiseParallel(_prepare_input=replicate_in, _prepare_output=gather_out),
        "net2": RowwiseParallel(_prepare_input=lambda x, m: make_input_replicate_1d(x, m)),
    }
    return vars(check_parity(MLP, plan, mesh_of(world), lambda s: torch.randn(3, 16)))


def _pairwise_user_functions(world: int) -> dict:
    style = PairwiseParallel(_prepare_input=replicate_in, _prepare_output=gather_out)
    return vars(check_parity(MLP, style, mesh_of(world), lambda s: torch.randn(2, 5, 16)))


def _dtensor_output(world: int) -> None:
    """A DTensor-returning output function hands back a DTensor with that placement."""
    mesh = mesh_of(world)
    torch.manual_seed(0)
    ref = MLP()
    torch.manual_seed(0)
    tp = parallelize_module(
        MLP(), mesh,
        {"net1": ColwiseParallel(), "net2": RowwiseParallel(_prepare_output=make_output_replicate_1d)},
    )
    x = torch.randn(4, 16)
    out = tp(x)
    assert isinstance(out, DTensor) and out.placements == (Replicate(),)
    torch.testing.assert_close(out.to_local(), ref(x))
    # A DTensor input to a Colwise layer is redistributed by DTensor itself.
    dt_in = DTensor.from_local(x.chunk(world, 0)[dist.get_rank()], mesh, [Shard(0)], run_check=False)
    out2 = tp.net1(make_input_shard_1d(dt_in, mesh, 0))
    assert out2.shape[-1] == 32 // world


def _default_mesh(world: int) -> None:
    torch.manual_seed(0)
    tp = parallelize_module(MLP(), PairwiseParallel())  # no mesh: the default group
    assert tp.net1.weight.device_mesh.size() == world
    torch.manual_seed(0)
    tp2 = parallelize_module(MLP(), mesh_of(world), PairwiseParallel())
    x = torch.randn(3, 16)
    torch.testing.assert_close(tp(x), tp2(x))


def _two_d_mesh(tp_dim: int) -> dict:
    mesh = mesh_of(2, 2)
    return vars(check_parity(MLP, PairwiseParallel(), mesh, lambda s: torch.randn(3, 16),
                             tp_mesh_dim=tp_dim))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("body", [_user_functions, _pairwise_user_functions])
def test_user_prepare_functions_are_honoured(pools, world, body):
    for report in pools(world).run(body, world):
        assert report["steps"] == 3


@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_outputs_and_inputs(pools, world):
    pools(world).run(_dtensor_output, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_default_mesh_is_the_world(pools, world):
    pools(world).run(_default_mesh, world)


@pytest.mark.parametrize("tp_dim", [0, 1, -1])
def test_two_d_mesh_parity(pools, tp_dim):
    for report in pools(4).run(_two_d_mesh, tp_dim):
        assert report["steps"] == 3
