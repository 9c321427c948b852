"""Local leaves of DTensor parameters: where gradients land when parameters change hands."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from shardwise import ColwiseParallel, RowwiseParallel, parallelize_module
from shardwise.testing import full, mesh_of


def _check_style(world: int, colwise: bool) -> None:
    mesh = mesh_of(world)
    torch.manual_seed(0)
    ref = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    style = ColwiseParallel(output_layouts=Replicate()) if colwise else RowwiseParallel()
    lin = nn.Linear(8, 6)
    lin.load_state_dict(ref.state_dict())
    lin = parallelize_module(lin, mesh, style)
    xin = x if colwise else x.chunk(world, -1)[mesh.get_local_rank()]
    ref_grad = torch.ones(6, 3) @ x

    # The installed parameters: the gradient reaches param.grad as a DTensor.
    lin(xin).sum().backward()
    assert isinstance(lin.weight.grad, DTensor)
    torch.testing.assert_close(full(lin.weight.grad), ref_grad)
    # A frozen weight gets no gradient; the bias still trains.
    lin.weight.grad = lin.bias.grad = None
    lin.weight.requires_grad_(False)
    lin(xin).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None
    lin.weight.requires_grad_(True)
    # Without grad mode: the same values, nothing recorded.
    with torch.no_grad():
        y = lin(xin)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.linear(x, ref.weight, ref.bias))
    # A parameter assigned in place of the installed one is the one used and trained.
    placements = list(lin.weight.placements)
    new = nn.Parameter(distribute_tensor(ref.weight.detach() * 2, mesh, placements))
    lin.weight = new
    lin(xin).sum().backward()
    assert new.grad is not None
    torch.testing.assert_close(full(new.grad), ref_grad)
    with torch.no_grad():
        torch.testing.assert_close(lin(xin), F.linear(x, ref.weight * 2, ref.bias))


def _grads_follow_the_parameters(world: int) -> None:
    _check_style(world, colwise=True)
    _check_style(world, colwise=False)


@pytest.mark.parametrize("world", [1, 2])
def test_grads_follow_the_parameters(pools, world):
    pools(world).run(_grads_follow_the_parameters, world)
