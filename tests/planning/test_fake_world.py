"""The planning tier: one process, a fake process group of 8 to 64 ranks, no communication.

torch's ``fake`` backend accepts every collective and does nothing, so a single process can
play one rank of a large world: expansion, validation and each rank's local shapes are
checked at sizes the gloo tier cannot start on two cores. (Values are meaningless here;
the gloo tier checks numbers.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    expand_plan,
    parallelize_module,
)
from shardwise.styles.primitives import SequenceShardedLayer, ShardedDropout, ShardedNorm
from shardwise.testing.models import GPTStack, gpt_block_plan


@contextmanager
def fake_world(world: int, rank: int) -> Iterator[DeviceMesh]:
    """This process as ``rank`` of a fake ``world``-rank job, for the duration of the block."""
    assert not dist.is_initialized(), "the planning tier runs without a real process group"
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _chunk(size: int, world: int, rank: int) -> int:
    """torch.chunk's length of piece ``rank`` (0 past the last non-empty piece)."""
    step = -(-size // world)
    return max(0, min(step, size - rank * step))


def test_expand_plan_is_flat_printable_and_leaves_the_model_alone():
    model = GPTStack(128, 64, 2)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    flat = expand_plan(model, {"blocks.*": gpt_block_plan()}, tp_size=64)
    assert list(flat) == [
        f"blocks.{i}.{name}" for i in range(2) for name in ("q", "k", "v", "o", "up", "down")
    ]
    kinds = {fqn.rsplit(".", 1)[1]: type(style) for fqn, style in flat.items()}
    assert kinds == {
        "q": ColwiseParallel, "k": ColwiseParallel, "v": ColwiseParallel,
        "o": RowwiseParallel, "up": ColwiseParallel, "down": RowwiseParallel,
    }
    assert "blocks.0.q: ColwiseParallel" in "\n".join(f"{k}: {v}" for k, v in flat.items())
    for name, p in model.named_parameters():  # untouched: same objects, same values, plain
        assert p is before[name][0] and not isinstance(p, DTensor), name
        assert torch.equal(p, before[name][1]), name


def test_sequence_parallel_expands_norms_dropouts_and_layer_io():
    layer = nn.TransformerEncoderLayer(64, 8, dim_feedforward=128)
    flat = expand_plan(layer, SequenceParallel(), tp_size=8)
    # The layer is an MLP pair plus the sequence-sharded I/O around the whole layer;
    # only the dropout between the pair draws per-rank masks.
    assert {k: type(v) for k, v in flat.items()} == {
        "dropout": ShardedDropout,
        "linear1": ColwiseParallel,
        "linear2": RowwiseParallel,
        "": SequenceShardedLayer,
    }
    flat = expand_plan(nn.Sequential(nn.LayerNorm(8), nn.Dropout(0.1)), SequenceParallel(), 16)
    assert [type(v) for v in flat.values()] == [ShardedNorm, ShardedDropout]
    # Two dropouts expanded from one plan share one stream (no two layers repeat masks).
    first, second = (
        s.rng for s in expand_plan(
            nn.ModuleList([nn.Dropout(0.1), nn.Dropout(0.1)]), SequenceParallel(), 2
        ).values()
    )
    assert first is second


@pytest.mark.parametrize(("world", "rank"), [(8, 3), (64, 63)])
def test_local_shapes_at_large_worlds(world, rank):
    with fake_world(world, rank) as mesh:
        model = parallelize_module(GPTStack(128, 64, 2), mesh, {"blocks.*": gpt_block_plan()})
        shapes = {n: (p.placements, tuple(p.to_local().shape)) for n, p in model.named_parameters()
                  if isinstance(p, DTensor)}
    per = 128 // world
    assert shapes["blocks.1.q.weight"] == ((Shard(0),), (per, 128))
    assert shapes["blocks.1.up.weight"] == ((Shard(0),), (4 * per, 128))
    assert shapes["blocks.1.down.weight"] == ((Shard(1),), (128, 4 * per))
    assert shapes["blocks.1.down.bias"] == ((Replicate(),), (128,))
    assert shapes["blocks.0.o.bias"] == ((Replicate(),), (128,))


def test_uneven_splits_follow_torch_chunk():
    world = 16
    for rank in (0, 13, 15):
        with fake_world(world, rank) as mesh:
            mlp = nn.Sequential(nn.Linear(24, 100), nn.ReLU(), nn.Linear(100, 24))
            mlp = parallelize_module(mlp, mesh, PairwiseParallel())
            assert mlp[0].weight.to_local().shape == (_chunk(100, world, rank), 24)
            assert mlp[2].weight.to_local().shape == (24, _chunk(100, world, rank))


def test_a_bad_plan_raises_the_same_error_in_planning_and_in_parallelize():
    def attempt(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the exception itself is compared
            return type(exc), str(exc)
        raise AssertionError("no error")

    bad_plans = [
        {"blocks.*": gpt_block_plan(), "blocks.0.q": ColwiseParallel()},  # two entries
        {"blocks.*.nope": ColwiseParallel()},  # matches nothing
        {"blocks.0.ln1": ColwiseParallel()},  # not a Linear
        {"blocks.0": 3},  # not a style
    ]
    for plan in bad_plans:
        planned = attempt(lambda plan=plan: expand_plan(GPTStack(32, 4, 2), plan, tp_size=64))
        with fake_world(64, 0) as mesh:
            applied = attempt(lambda plan=plan: parallelize_module(GPTStack(32, 4, 2), mesh, plan))
        assert planned == applied, (plan, planned, applied)
    with pytest.raises(ValueError, match="tp_size"):
        expand_plan(GPTStack(32, 4, 2), gpt_block_plan(), tp_size=0)
