"""TP-aware dropout randomness: replicated regions agree across ranks, sharded ones differ."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardwise import PairwiseParallel, SequenceParallel, parallelize_module
from shardwise.random import TensorParallelRNG, get_rng_state, manual_seed, set_rng_state
from shardwise.testing import mesh_of


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


class DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.drop = nn.Dropout(0.5)   # between the pair: sharded hidden units
        self.down = nn.Linear(64, 16)
        self.out_drop = nn.Dropout(0.5)  # after the pair: replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_drop(self.down(self.drop(torch.relu(self.up(x)))))


def _mlp_masks(world: int) -> None:
    torch.manual_seed(0)
    model = parallelize_module(DropMLP(), mesh_of(world), PairwiseParallel())
    hidden: list[torch.Tensor] = []
    model.drop.register_forward_hook(lambda m, i, o: hidden.append((o == 0).float()))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(9))
    y = model(x)
    # Replicated region: every rank computed the same output (same out_drop mask).
    outs = _gathered(y)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=0, atol=0)
    # Sharded region: each rank's hidden-unit mask differs.
    masks = _gathered(hidden[0])
    assert not torch.equal(masks[0], masks[1])
    # The default generator is still in step on every rank.
    states = _gathered(torch.get_rng_state().float())
    assert all(torch.equal(s, states[0]) for s in states)
    # Reproducible from the seed.
    torch.manual_seed(0)
    again = parallelize_module(DropMLP(), mesh_of(world), PairwiseParallel())
    torch.testing.assert_close(again(x), y, rtol=0, atol=0)


def _encoder_layer(world: int) -> None:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.3)
    layer = parallelize_module(layer, mesh_of(world), PairwiseParallel())
    assert hasattr(layer.dropout, "_shardwise_rng")
    assert not hasattr(layer.dropout1, "_shardwise_rng")
    y = layer(torch.randn(6, 2, 16))
    outs = _gathered(y)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=0, atol=0)


def _attention_dropout(world: int) -> None:
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, dropout=0.5)
    tpma = parallelize_module(mha, mesh_of(world), PairwiseParallel())
    x = torch.randn(5, 2, 16)
    out, _ = tpma(x, x, x, need_weights=False)
    outs = _gathered(out)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=0, atol=0)
    states = _gathered(torch.get_rng_state().float())
    assert all(torch.equal(s, states[0]) for s in states)


def _sequence_dropout(world: int) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Dropout(0.5))
    model = parallelize_module(model, mesh_of(world), {"0": SequenceParallel()})
    y = model(torch.ones(8, 4))
    masks = _gathered((y == 0).float())
    assert not torch.equal(masks[0], masks[1])
    model.eval()
    torch.testing.assert_close(model(torch.ones(8, 4)), torch.ones(8, 4))


def _streams(world: int) -> None:
    rng = manual_seed(7, mesh_of(world))
    before = torch.get_rng_state()
    with rng.sharded():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with rng.sharded():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the stream advances
    fresh = TensorParallelRNG(mesh_of(world), 7)
    with fresh.sharded():
        assert torch.equal(torch.rand(4), a)  # reproducible from the seed
    draws = _gathered(a)
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "body", [_mlp_masks, _encoder_layer, _attention_dropout, _sequence_dropout, _streams]
)
@pytest.mark.parametrize("world", [2, 4])
def test_tp_rng(pools, world, body):
    pools(world).run(body, world)


def _rng_state_roundtrip(world: int) -> None:
    torch.manual_seed(0)
    model = parallelize_module(DropMLP(), mesh_of(world), PairwiseParallel())
    x = torch.randn(8, 16)
    state = get_rng_state(model)
    assert len(state["tp"]) == 1 and state["tp"][0]["tp_rank"] == dist.get_rank()
    first = model(x)
    assert not torch.equal(model(x), first)  # the streams advance
    set_rng_state(model, state)
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)  # same masks again
    # A state for another model (no sharded streams) is refused before anything changes.
    plain_state = get_rng_state(nn.Linear(2, 2))
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"holds 0 tensor-parallel stream\(s\), the model 1"):
        set_rng_state(model, plain_state)
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_state_roundtrip(pools):
    pools(2).run(_rng_state_roundtrip, 2)
