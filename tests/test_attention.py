"""TensorParallelMultiheadAttention: equal to nn.MultiheadAttention, sharded and not."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import (
    PairwiseParallel,
    ParallelStyle,
    SequenceParallel,
    TensorParallelMultiheadAttention,
    make_input_replicate_1d,
    make_output_replicate_1d,
    parallelize_module,
)
from shardwise.multihead_attention_tp import check_attention
from shardwise.testing import check_parity, expect_raises, full, mesh_of

TPMA = TensorParallelMultiheadAttention
E, H, L, N = 16, 4, 8, 2
WORLDS = [1, 2, 4]


# -- helpers ---------------------------------------------------------------------------------
def make_tpma_from(mha: nn.MultiheadAttention, **kwargs: object) -> TPMA:
    return TPMA.from_multihead_attention(mha, **kwargs)  # type: ignore[arg-type]


def per_head_to_mha(w: torch.Tensor) -> torch.Tensor:
    """Undo ``copy``'s row order: per head ``[q_h; k_h; v_h]`` -> ``[W_q; W_k; W_v]``."""
    d = E // H
    return w.reshape(H, 3, d, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def make_masks(kind: str, batch: int = N, length: int = L) -> dict[str, torch.Tensor]:
    """Masks that never hide a whole row (keys 0..2 always stay visible)."""
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 3:] = True
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(batch * H, length, length, generator=gen)
    as_float = lambda m: torch.zeros(m.shape).masked_fill(m, float("-inf"))
    return {
        "none": {},
        "causal_bool": {"attn_mask": causal},
        "causal_float": {"attn_mask": as_float(causal)},
        "3d_float": {"attn_mask": noise},
        "3d_bool": {"attn_mask": causal.expand(batch * H, -1, -1).clone()},
        "pad_bool": {"key_padding_mask": pad},
        "pad_float": {"key_padding_mask": as_float(pad)},
        "both": {"attn_mask": noise, "key_padding_mask": as_float(pad)},
    }[kind]


def layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``[N, L, E]`` -> the module's layout."""
    return x if batch_first else x.transpose(0, 1).contiguous()


# -- (1) single process: TPMA after copy() equals nn.MultiheadAttention -------------------------
MASKS = [
    "none",
    "causal_bool",
    "causal_float",
    "3d_float",
    "3d_bool",
    "pad_bool",
    "pad_float",
    "both",
]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", MASKS)
def test_copy_equals_mha(masks, batch_first, need_weights, average, tp_size):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    tpma = TPMA(E, H, batch_first=batch_first, tp_size=tp_size).copy(mha)
    x = layout(torch.randn(N, L, E), batch_first)
    kwargs = dict(make_masks(masks), need_weights=need_weights, average_attn_weights=average)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, w_ref = mha(x_ref, x_ref, x_ref, **kwargs)
    out_tp, w_tp = tpma(x_tp, x_tp, x_tp, **kwargs)
    torch.testing.assert_close(out_tp, out_ref)
    if need_weights:
        torch.testing.assert_close(w_tp, w_ref)
    else:
        assert w_ref is None and w_tp is None
    grad = torch.randn(out_ref.shape)
    (out_ref * grad).sum().backward()
    (out_tp * grad).sum().backward()
    torch.testing.assert_close(x_tp.grad, x_ref.grad)
    torch.testing.assert_close(per_head_to_mha(tpma.qkv.weight.grad), mha.in_proj_weight.grad)
    torch.testing.assert_close(per_head_to_mha(tpma.qkv.bias.grad), mha.in_proj_bias.grad)
    torch.testing.assert_close(tpma.proj.weight.grad, mha.out_proj.weight.grad)


@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_and_no_bias(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=False)
    tpma = make_tpma_from(mha)
    assert tpma.qkv.bias is None and tpma.proj.bias is None
    x = torch.randn(L, E)
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    kwargs = {"need_weights": need_weights, "attn_mask": mask, "average_attn_weights": False}
    out_ref, w_ref = mha(x, x, x, **kwargs)
    out_tp, w_tp = tpma(x, x, x, **kwargs)
    torch.testing.assert_close(out_tp, out_ref)
    if need_weights:
        torch.testing.assert_close(w_tp, w_ref)


def test_cross_attention_equals_mha():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    tpma = TPMA(E, H, batch_first=True, self_attention=False).copy(mha)
    q, mem = torch.randn(N, L, E), torch.randn(N, 5, E)
    pad = torch.zeros(N, 5, dtype=torch.bool)
    pad[1, 4] = True
    out_ref, w_ref = mha(q, mem, mem, key_padding_mask=pad)
    out_tp, w_tp = tpma(q, mem, mem, key_padding_mask=pad)
    torch.testing.assert_close(out_tp, out_ref)
    torch.testing.assert_close(w_tp, w_ref)


def test_carries_config_dtype_device():
    mha = nn.MultiheadAttention(E, H, dropout=0.25, batch_first=True, dtype=torch.float64).eval()
    tpma = make_tpma_from(mha)
    assert (tpma.batch_first, tpma.dropout, tpma.training) == (True, 0.25, False)
    assert all(p.dtype == torch.float64 for p in tpma.parameters())
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(tpma(x, x, x)[0], mha(x, x, x)[0])
    meta = TPMA(E, H, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.float16)}


def test_inside_encoder_layer_eval():
    """Swapped into nn.TransformerEncoderLayer, the inference fast-path check falls back cleanly."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True).eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        ref = layer(x)  # fast path
        layer.self_attn = make_tpma_from(layer.self_attn)
        torch.testing.assert_close(layer(x), ref)


def test_constructor_and_forward_errors():
    expect_raises(ValueError, TPMA, 24, 6, tp_size=4, match="divisible")
    expect_raises(ValueError, TPMA, 18, 4, match="divisible")
    for kwargs in [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 8}, {"vdim": 8}]:
        expect_raises(NotImplementedError, TPMA, E, H, **kwargs)
    tpma = TPMA(E, H)
    x = torch.randn(L, N, E)
    expect_raises(AssertionError, tpma, x, x + 1, x, match="self-attention")
    expect_raises(RuntimeError, tpma, x, x, x, is_causal=True, match="attn_mask")
    expect_raises(RuntimeError, tpma, x, x, x, attn_mask=torch.zeros(3, 3), match="attn_mask")
    expect_raises(NotImplementedError, tpma.copy, nn.MultiheadAttention(E, H, add_bias_kv=True))
    expect_raises(ValueError, tpma.copy, nn.MultiheadAttention(E, 2))
    expect_raises(
        ValueError,
        check_attention,
        nn.MultiheadAttention(24, 6),
        "blk.attn",
        4,
        match="blk.attn.*num_heads=6.*divisible.*4",
    )
    expect_raises(
        NotImplementedError, check_attention, nn.MultiheadAttention(E, H, kdim=8, vdim=8), "attn", 2
    )
    check_attention(nn.MultiheadAttention(24, 6), "attn", 2)


# -- (2)-(4) distributed bodies (module level: the rank pool imports them by name) -------------
def _mha_builder(batch_first: bool = False, **kwargs: object):
    return lambda: make_tpma_from(nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs))


def _pairwise_parity(world: int, batch_first: bool, masks: str, need_weights: bool) -> dict:
    kwargs = dict(make_masks(masks), need_weights=need_weights)
    report = check_parity(
        _mha_builder(batch_first),
        PairwiseParallel(),
        mesh_of(world),
        lambda step: layout(torch.randn(N, L, E), batch_first),
        call=lambda m, x: m(x, x, x, **kwargs),
    )
    return vars(report)


def _cross_parity(world: int) -> dict:
    mem = torch.randn(5, N, E, generator=torch.Generator().manual_seed(3))
    report = check_parity(
        lambda: TPMA(E, H, self_attention=False),
        PairwiseParallel(),
        mesh_of(world),
        lambda step: torch.randn(L, N, E),
        call=lambda m, x: m(x, mem, mem),
    )
    return vars(report)


def _sequence_parity(world: int, need_weights: bool) -> dict:
    mask = make_masks("3d_float")
    report = check_parity(
        _mha_builder(),
        SequenceParallel(),
        mesh_of(world),
        lambda step: torch.randn(L, N, E),
        sequence_dim=0,
        call=lambda m, x: m(x, x, x, need_weights=need_weights, **mask),
    )
    return vars(report)


def _swap_equals_mha(world: int, sequence: bool) -> list[str]:
    """parallelize_module on nn.MultiheadAttention returns a TPMA with mha's numbers."""
    torch.manual_seed(0)
    batch_first = not sequence  # SequenceParallel shards dim 0: the sequence when [L, N, E]
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = layout(torch.randn(N, L, E), batch_first)
    style = SequenceParallel() if sequence else PairwiseParallel()
    tpma = parallelize_module(mha, mesh_of(world), style)
    assert type(tpma) is TPMA and tpma.batch_first == batch_first
    assert tpma.qkv.weight.placements == (Shard(0),) and tpma.qkv.bias.placements == (Shard(0),)
    assert tpma.proj.weight.placements == (Shard(1),)
    assert tpma.proj.bias.placements == (Replicate(),)
    assert tpma.qkv.weight.to_local().shape == (3 * E // world, E)
    rank = torch.distributed.get_rank()
    mine = (lambda t: t.chunk(world, 0)[rank]) if sequence else (lambda t: t)
    checked = []
    for masks, average in itertools.product(["none", "3d_float", "both"], [True, False]):
        kwargs = dict(make_masks(masks), average_attn_weights=average)
        x_ref, x_tp = x.clone().requires_grad_(), mine(x).clone().requires_grad_()
        out_ref, w_ref = mha(x_ref, x_ref, x_ref, **kwargs)
        out_tp, w_tp = tpma(x_tp, x_tp, x_tp, **kwargs)
        torch.testing.assert_close(out_tp, mine(out_ref))
        torch.testing.assert_close(w_tp, w_ref)
        out_ref.sum().backward()
        out_tp.sum().backward()
        torch.testing.assert_close(x_tp.grad, mine(x_ref.grad))
        checked.append(f"{masks}/{average}")
    return checked


def _comm_counts(world: int, sequence: bool, need_weights: bool) -> tuple[dict, dict]:
    """Collectives in one forward and one backward (local hot path: no DTensor redistributes)."""
    style = SequenceParallel() if sequence else PairwiseParallel()
    tpma = parallelize_module(nn.MultiheadAttention(E, H), mesh_of(world), style)
    x = torch.randn(L // world if sequence else L, N, E, requires_grad=True)
    with torch.no_grad():  # warm-up: a first sequence gather also agrees on its buffer size
        tpma(x, x, x, need_weights=need_weights)
    with CommDebugMode() as fwd:
        out, _ = tpma(x, x, x, need_weights=need_weights)
    with CommDebugMode() as bwd:
        out.sum().backward()
    names = lambda mode: {str(k): v for k, v in mode.get_comm_counts().items()}
    return names(fwd), names(bwd)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class _ReplicatedOut(ParallelStyle):
    """A user style: replicated DTensor out instead of a plain tensor."""

    def __init__(self) -> None:
        super().__init__(make_input_replicate_1d, make_output_replicate_1d)


def _nested_and_custom_style(world: int) -> bool:
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(L, N, E)
    ref = block(x)
    block = parallelize_module(block, mesh_of(world), {"attn": PairwiseParallel()})
    assert isinstance(block.attn, TPMA)
    torch.testing.assert_close(block(x), ref)
    mha = nn.MultiheadAttention(E, H)
    out_ref, _ = mha(x, x, x)
    tpma = parallelize_module(mha, mesh_of(world), _ReplicatedOut())
    out, _ = tpma(x, x, x)
    assert isinstance(out, DTensor) and out.placements == (Replicate(),)
    torch.testing.assert_close(full(out), out_ref)
    return [type(block.attn).__name__, type(tpma).__name__, list(out.placements), out.to_local().shape]


def _errors_on_every_rank(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = [
        expect_raises(
            ValueError,
            parallelize_module,
            nn.MultiheadAttention(24, 6),
            mesh,
            PairwiseParallel(),
            match="divisible",
        ),
        expect_raises(
            NotImplementedError,
            parallelize_module,
            nn.MultiheadAttention(E, H, add_bias_kv=True),
            mesh,
            PairwiseParallel(),
            match="add_bias_kv",
        ),
        expect_raises(
            NotImplementedError,
            parallelize_module,
            nn.MultiheadAttention(E, H, add_zero_attn=True),
            mesh,
            SequenceParallel(),
        ),
        expect_raises(
            ValueError, parallelize_module, TPMA(24, 6), mesh, PairwiseParallel(), match="divisible"
        ),
    ]
    tpma = parallelize_module(TPMA(E, H), mesh, PairwiseParallel())
    msgs.append(
        expect_raises(
            RuntimeError,
            parallelize_module,
            tpma,
            mesh,
            PairwiseParallel(),
            match="already parallelized",
        )
    )
    return msgs


# -- distributed tests ----------------------------------------------------------------------
def _ok(reports: list[dict]) -> None:
    for report in reports:
        assert report["steps"] == 3 and report["grads"] >= 4 and report["params"] >= 4


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "batch_first,masks,need_weights",
    [(False, "none", False), (True, "both", True), (False, "3d_bool", True)],
)
def test_pairwise_parity(pools, world, batch_first, masks, need_weights):
    _ok(pools(world).run(_pairwise_parity, world, batch_first, masks, need_weights))


@pytest.mark.parametrize("world", WORLDS)
def test_cross_attention_parity(pools, world):
    _ok(pools(world).run(_cross_parity, world))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_sequence_parallel_parity(pools, world, need_weights):
    _ok(pools(world).run(_sequence_parity, world, need_weights))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sequence", [False, True])
def test_swap_equals_mha(pools, world, sequence):
    for checked in pools(world).run(_swap_equals_mha, world, sequence):
        assert len(checked) == 6


@pytest.mark.parametrize("world", [2, 4])
def test_nested_swap_and_custom_style(pools, world):
    for got in pools(world).run(_nested_and_custom_style, world):
        assert got == ["TensorParallelMultiheadAttention"] * 2 + [[Replicate()], (L, N, E)], got


AR, AG, RS = "c10d.allreduce_", "c10d._allgather_base_", "c10d._reduce_scatter_base_"


@pytest.mark.parametrize(
    "sequence,need_weights,forward,backward",
    [
        (False, False, {AR: 1}, {AR: 1}),  # g out; f's all-reduce of the input gradient
        (False, True, {AR: 2}, {AR: 1}),  # + the head-average of the weights
        # Sequence parallel: backward all-gathers the saved input shard again for the
        # in-projections' weight gradients (one for q/k/v together).
        (True, False, {AG: 1, RS: 1}, {AG: 2, RS: 1}),
        (True, True, {AG: 1, AR: 1, RS: 1}, {AG: 2, RS: 1}),
    ],
)
def test_comm_counts(pools, sequence, need_weights, forward, backward):
    for fwd, bwd in pools(2).run(_comm_counts, 2, sequence, need_weights):
        assert (fwd, bwd) == (forward, backward)


def test_errors_on_every_rank(pools):
    results = pools(4).run(_errors_on_every_rank, 4)
    assert len(results) == 4 and all(len(msgs) == 5 for msgs in results)
