"""The seed's make_* functions: placements, values and errors, for plain and DTensor inputs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import shardwise
from shardwise import style
from shardwise.testing import expect_raises, mesh_of


def _global(world: int) -> torch.Tensor:
    return torch.arange(world * 4 * 8, dtype=torch.float32).reshape(world * 4, 8)


def _input_functions(world: int) -> None:
    mesh = mesh_of(world)
    rank = dist.get_rank()
    g = _global(world)
    mine = g.chunk(world, 0)[rank]

    # replicate_1d: a plain tensor is trusted as the replica; a DTensor is redistributed.
    for kw in ({}, {"device_mesh": mesh}):
        out = shardwise.make_input_replicate_1d(g, **kw) if kw else shardwise.make_input_replicate_1d(g, mesh)
        assert isinstance(out, DTensor) and out.placements == (Replicate(),)
        torch.testing.assert_close(out.to_local(), g)
    sharded = distribute_tensor(g, mesh, [Shard(0)])
    out = shardwise.make_input_replicate_1d(sharded)  # mesh inferred
    assert out.placements == (Replicate(),)
    torch.testing.assert_close(out.to_local(), g)

    # shard_1d: plain = this rank's shard, global size x W.
    out = shardwise.make_input_shard_1d(mine, device_mesh=mesh, dim=0)
    assert out.placements == (Shard(0),) and out.shape == g.shape
    torch.testing.assert_close(out.full_tensor(), g)
    out = shardwise.make_input_shard_1d(distribute_tensor(g, mesh, [Replicate()]), dim=1)
    assert out.placements == (Shard(1),)
    torch.testing.assert_close(out.to_local(), g.chunk(world, 1)[rank])

    # shard_1d_last_dim
    last = g.chunk(world, 1)[rank]
    out = shardwise.make_input_shard_1d_last_dim(last, mesh)
    assert out.placements == (Shard(1),)
    torch.testing.assert_close(out.full_tensor(), g)
    out = shardwise.make_input_shard_1d_last_dim([last], device_mesh=mesh)  # list input
    assert out.placements == (Shard(1),)

    # reshard_replicate: every rank's dim-0 piece, all-gathered.
    out = shardwise.make_input_reshard_replicate(mine, mesh)
    assert out.placements == (Replicate(),)
    torch.testing.assert_close(out.to_local(), g)
    out = shardwise.make_input_reshard_replicate(mine, device_mesh=mesh)
    torch.testing.assert_close(out.to_local(), g)


def _output_functions(world: int) -> None:
    mesh = mesh_of(world)
    rank = dist.get_rank()
    g = _global(world)
    partial = DTensor.from_local(g / world, mesh, [Partial()], run_check=False)
    sharded = distribute_tensor(g, mesh, [Shard(0)])

    out = shardwise.make_output_replicate_1d(partial)
    assert out.placements == (Replicate(),)
    torch.testing.assert_close(out.to_local(), g)
    out = shardwise.make_output_replicate_1d(sharded, device_mesh=mesh)
    torch.testing.assert_close(out.to_local(), g)

    out = shardwise.make_output_shard_1d(partial, mesh, dim=0)
    assert out.placements == (Shard(0),)
    torch.testing.assert_close(out.to_local(), g.chunk(world, 0)[rank])
    out = shardwise.make_output_shard_1d(sharded, dim=1)
    assert out.placements == (Shard(1),)
    torch.testing.assert_close(out.to_local(), g.chunk(world, 1)[rank])

    out = shardwise.make_output_tensor(partial)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, g)
    out = shardwise.make_output_tensor(sharded, device_mesh=mesh)
    torch.testing.assert_close(out, g)

    out = shardwise.make_output_reshard_tensor(partial)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, g.chunk(world, 0)[rank])

    out = shardwise.make_sharded_output_tensor(sharded)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, g.chunk(world, 0)[rank])


def _gradients(world: int) -> None:
    """Every function is differentiable back to the plain local input."""
    mesh = mesh_of(world)
    rank = dist.get_rank()
    g = _global(world)
    mine = g.chunk(world, 0)[rank].clone().requires_grad_()
    out = shardwise.make_input_reshard_replicate(mine, mesh)
    (out.to_local() * 2).sum().backward()
    # to_local() declares the gradient replicated, so each rank keeps its slice of it.
    torch.testing.assert_close(mine.grad, torch.full_like(mine, 2.0))
    x = g.clone().requires_grad_()
    out = shardwise.make_input_shard_1d_last_dim(x.chunk(world, 1)[rank], mesh)
    (out.full_tensor() * 3).sum().backward()
    mine_grad = x.grad.chunk(world, 1)[rank]
    torch.testing.assert_close(mine_grad, torch.full_like(mine_grad, 3.0))


def _errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    t = torch.ones(2, 4)
    messages = [
        expect_raises(RuntimeError, shardwise.make_input_replicate_1d, t, match="mesh"),
        expect_raises(RuntimeError, shardwise.make_input_shard_1d, t, match="mesh"),
        expect_raises(RuntimeError, shardwise.make_input_reshard_replicate, t, None, match="mesh"),
        expect_raises(RuntimeError, shardwise.make_input_replicate_1d, "x", mesh, match="Tensor"),
        expect_raises(AssertionError, shardwise.make_output_tensor, t, mesh, match="DTensor"),
        expect_raises(AssertionError, shardwise.make_output_replicate_1d, [t], match="DTensor"),
    ]
    if world == 4:
        mesh2d = mesh_of(2, 2)
        messages.append(
            expect_raises(RuntimeError, shardwise.make_input_replicate_1d, t, mesh2d, match="dims 2")
        )
        messages.append(
            expect_raises(RuntimeError, shardwise.make_input_shard_1d_last_dim, t,
                          device_mesh=mesh2d, match="dims 2")
        )
        dt = distribute_tensor(torch.ones(4, 4), mesh2d, [Replicate(), Replicate()])
        messages.append(expect_raises(AssertionError, shardwise.make_output_tensor, dt, match="dims 2"))
    return messages


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("body", [_input_functions, _output_functions, _gradients])
def test_layout_functions(pools, world, body):
    pools(world).run(body, world)


@pytest.mark.parametrize("world", [2, 4])
def test_layout_errors_on_every_rank(pools, world):
    results = pools(world).run(_errors, world, timeout=30)
    assert len(results) == world and all(len(r) >= 6 for r in results)


def test_seed_defaults_and_reexports():
    assert shardwise.ColwiseParallel()._prepare_input is shardwise.make_input_replicate_1d
    assert shardwise.ColwiseParallel()._prepare_output is shardwise.make_sharded_output_tensor
    assert shardwise.RowwiseParallel()._prepare_input is shardwise.make_input_shard_1d_last_dim
    assert shardwise.RowwiseParallel()._prepare_output is shardwise.make_output_tensor
    # The seed stores its defaults when given None (SEMANTICS.md, PairwiseParallel).
    for p in (shardwise.PairwiseParallel(), shardwise.PairwiseParallel(None, None)):
        assert p._prepare_input is shardwise.make_input_replicate_1d
        assert p._prepare_output is shardwise.make_output_tensor
    sp = shardwise.SequenceParallel()
    assert isinstance(sp, shardwise.PairwiseParallel)
    assert sp._prepare_input is shardwise.make_input_reshard_replicate
    assert sp._prepare_output is shardwise.make_output_reshard_tensor
    for name in style.__all__:
        assert getattr(shardwise, name) is getattr(style, name)
    with pytest.raises(TypeError):
        shardwise.ParallelStyle(None, None)  # abstract
    from shardwise.api import parallelize_module
    from shardwise.multihead_attention_tp import TensorParallelMultiheadAttention

    assert parallelize_module is shardwise.parallelize_module
    assert TensorParallelMultiheadAttention is shardwise.TensorParallelMultiheadAttention
