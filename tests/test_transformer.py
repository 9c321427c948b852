"""PairwiseParallel / SequenceParallel on nn.Transformer and its layers: FFN tensor parallelism."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardwise import PairwiseParallel, SequenceParallel
from shardwise.testing import check_parity, mesh_of

D, NHEAD, FF, S, T, B = 16, 4, 32, 8, 8, 2
WORLDS = [1, 2, 4]


def _encoder(**kwargs: object) -> Callable[[], nn.Module]:
    return lambda: nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, **kwargs)


def _decoder() -> nn.Module:
    return nn.TransformerDecoderLayer(D, NHEAD, FF, dropout=0.0)


def _transformer() -> nn.Module:
    return nn.Transformer(
        D, NHEAD, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=FF, dropout=0.0
    )


def _fixed(*shape: int, seed: int = 3) -> torch.Tensor:
    """The same tensor on every rank (memory for the decoder, tgt for the transformer)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mine_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t``, or this rank's dim-0 chunk of it when ``x`` is a sequence shard."""
    if x.shape[0] == S:
        return t
    world = t.shape[0] // x.shape[0]
    return t.chunk(world, 0)[dist.get_rank()]


def _report(build: Callable[[], nn.Module], report: object) -> dict:
    """The report, plus whether parameter FQNs are exactly those of the unsharded module."""
    names = sorted(n for n, _ in build().named_parameters())
    return {**vars(report), "same_names": names == report.names}  # type: ignore[attr-defined]


# -- bodies (module level: the rank pool imports them by name) ------------------------------
def _encoder_pairwise(world: int, variant: str) -> dict:
    if variant == "default":
        build, x_shape, mask = _encoder(), (S, B, D), None
    else:  # batch-first, pre-norm, GELU, with a causal mask and padding
        build = _encoder(batch_first=True, norm_first=True, activation="gelu")
        x_shape, mask = (B, S, D), nn.Transformer.generate_square_subsequent_mask(S)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 5:] = True

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return m(x)
        return m(x, src_mask=mask, src_key_padding_mask=pad, is_causal=True)

    report = check_parity(
        build, PairwiseParallel(), mesh_of(world), lambda step: torch.randn(*x_shape), call=call
    )
    return _report(build, report)


def _layout_after_pairwise(world: int) -> bool:
    layer = nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0)
    from shardwise import parallelize_module

    layer = parallelize_module(layer, mesh_of(world), PairwiseParallel())
    assert type(layer.self_attn) is nn.MultiheadAttention
    assert not isinstance(layer.self_attn.in_proj_weight, DTensor)
    assert layer.linear1.weight.placements == (Shard(0),)
    assert layer.linear2.weight.placements == (Shard(1),)
    assert layer.linear2.bias.placements == (Replicate(),)
    return [tuple(layer.linear1.weight.to_local().shape), tuple(layer.linear2.weight.to_local().shape)]


def _decoder_pairwise(world: int) -> dict:
    memory = _fixed(6, B, D)
    report = check_parity(
        _decoder,
        PairwiseParallel(),
        mesh_of(world),
        lambda step: torch.randn(T, B, D),
        call=lambda m, x: m(x, memory),
    )
    return _report(_decoder, report)


def _transformer_pairwise(world: int) -> dict:
    tgt = _fixed(T, B, D)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    report = check_parity(
        _transformer,
        PairwiseParallel(),
        mesh_of(world),
        lambda step: torch.randn(S, B, D),
        call=lambda m, src: m(src, tgt, tgt_mask=mask, tgt_is_causal=True),
    )
    return _report(_transformer, report)


def _encoder_sequence(world: int) -> dict:
    build = _encoder()
    report = check_parity(
        build, SequenceParallel(), mesh_of(world), lambda step: torch.randn(S, B, D), sequence_dim=0
    )
    return _report(build, report)


def _decoder_sequence(world: int) -> dict:
    memory = _fixed(S, B, D)
    report = check_parity(
        _decoder,
        SequenceParallel(),
        mesh_of(world),
        lambda step: torch.randn(T, B, D),
        sequence_dim=0,
        call=lambda m, x: m(x, _mine_like(memory, x)),
    )
    return _report(_decoder, report)


def _transformer_sequence(world: int) -> dict:
    tgt = _fixed(T, B, D)
    report = check_parity(
        _transformer,
        SequenceParallel(),
        mesh_of(world),
        lambda step: torch.randn(S, B, D),
        sequence_dim=0,
        call=lambda m, src: m(src, _mine_like(tgt, src)),
    )
    return _report(_transformer, report)


# -- tests ------------------------------------------------------------------------------------
def _ok(reports: list[dict]) -> None:
    for report in reports:
        # Every parameter's gradient and value compared at each of the 3 steps.
        n = len(report["names"])
        assert report["steps"] == 3 and report["grads"] == report["params"] == 3 * n > 0, report
        assert report["same_names"], "parallelization changed parameter names"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", ["default", "batch_first_prenorm_masked"])
def test_encoder_layer_pairwise(pools, world, variant):
    _ok(pools(world).run(_encoder_pairwise, world, variant))


@pytest.mark.parametrize("world", [2, 4])
def test_encoder_layer_layout(pools, world):
    for shapes in pools(world).run(_layout_after_pairwise, world):
        assert shapes == [(FF // world, D), (D, FF // world)], shapes


@pytest.mark.parametrize("world", WORLDS)
def test_decoder_layer_pairwise(pools, world):
    _ok(pools(world).run(_decoder_pairwise, world))


@pytest.mark.parametrize("world", WORLDS)
def test_transformer_pairwise(pools, world):
    _ok(pools(world).run(_transformer_pairwise, world))


@pytest.mark.parametrize("world", WORLDS)
def test_encoder_layer_sequence_parallel(pools, world):
    _ok(pools(world).run(_encoder_sequence, world))


@pytest.mark.parametrize("world", [2, 4])
def test_decoder_layer_sequence_parallel(pools, world):
    _ok(pools(world).run(_decoder_sequence, world))


@pytest.mark.parametrize("world", [2, 4])
def test_transformer_sequence_parallel(pools, world):
    # encoder.norm / decoder.norm run on sequence shards outside the wrapped layers: their
    # weight gradients must be summed over the TP group (shardwise._engine.sequence_norm).
    _ok(pools(world).run(_transformer_sequence, world))
