"""nn.Embedding under RowwiseParallel (vocabulary shards) and ColwiseParallel (feature shards)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from shardwise._engine.collectives import chunk_range
from shardwise.testing import check_parity, expect_raises, full, mesh_of
from test_modern_layouts import AG, AR, RS, fwd_bwd_counts, io_parity

WORLDS = [1, 2, 4]
PAD = 3


def ids(vocab: int, shape: tuple[int, ...] = (3, 8)) -> Callable[[int], torch.Tensor]:
    """Token ids covering the vocabulary, with the padding id sprinkled in."""

    def make(step: int) -> torch.Tensor:
        x = torch.randint(0, vocab, shape)
        x.view(-1)[::5] = PAD
        return x

    return make


def emb(vocab: int, dim: int = 8, **kw: Any) -> Callable[[], nn.Embedding]:
    return lambda: nn.Embedding(vocab, dim, **kw)


class TinyLM(nn.Module):
    """Embedding -> SP norm -> gather -> MLP-ish projection -> replicated logits ``[B, S, V]``."""

    def __init__(self, vocab: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def tiny_lm_plan() -> dict[str, Any]:
    # torchtitan's shape of plan, sequence dim 1: replicated ids in, sequence shards between
    # the layers, vocabulary-sharded head gathered at the end.
    return {
        "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


CASES: dict[str, Callable[[int], int]] = {
    # RowwiseParallel: vocabulary shards; 10 tokens on 4 ranks are 3, 3, 3, 1 and 5 are 2, 2, 1, 0.
    "row_replicated": lambda w: (
        check_parity(
            emb(16, padding_idx=PAD),
            RowwiseParallel(input_layouts=Replicate()),
            mesh_of(w),
            ids(16),
        ).grads
    ),
    "row_uneven_10": lambda w: (
        check_parity(
            emb(10, padding_idx=PAD),
            RowwiseParallel(input_layouts=Replicate()),
            mesh_of(w),
            ids(10),
        ).grads
    ),
    "row_uneven_5_empty_shard": lambda w: (
        check_parity(emb(5), RowwiseParallel(input_layouts=Replicate()), mesh_of(w), ids(5)).grads
    ),
    "row_dtensor": lambda w: (
        check_parity(
            emb(10, padding_idx=PAD),
            RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
            mesh_of(w),
            ids(10),
        ).grads
    ),
    "row_sequence_in_out": lambda w: (
        check_parity(
            emb(10, padding_idx=PAD),
            RowwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)),
            mesh_of(w),
            ids(10),
            sequence_dim=1,
        ).grads
    ),
    "row_replicated_in_sequence_out": lambda w: io_parity(
        emb(10, padding_idx=PAD),
        RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        w,
        ids(10),
        out_dim=1,
    ),
    "row_torch_default_gathers_ids": lambda w: io_parity(
        # torch's default input_layouts=Shard(-1): ids arrive split on their last dim.
        emb(10, padding_idx=PAD),
        RowwiseParallel(),
        w,
        ids(10),
        in_dim=1,
    ),
    "row_seed_functions": lambda w: io_parity(emb(10), RowwiseParallel(), w, ids(10), in_dim=-1),
    # ColwiseParallel: embedding-dim shards.
    "col_default_local": lambda w: io_parity(
        emb(10, padding_idx=PAD), ColwiseParallel(), w, ids(10), out_dim=-1
    ),
    "col_gathered": lambda w: (
        check_parity(
            emb(10, padding_idx=PAD),
            ColwiseParallel(output_layouts=Replicate()),
            mesh_of(w),
            ids(10),
        ).grads
    ),
    "col_dtensor_uneven_dim": lambda w: (
        check_parity(
            emb(10, 6, padding_idx=PAD),
            ColwiseParallel(use_local_output=False),
            mesh_of(w),
            ids(10),
        ).grads
    ),
    "col_sequence_ids_freq": lambda w: io_parity(
        emb(10, scale_grad_by_freq=True),
        ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        w,
        ids(10),
        in_dim=1,
    ),
    "col_sequence_ids_dim0": lambda w: io_parity(
        emb(10, padding_idx=PAD),
        ColwiseParallel(input_layouts=Shard(0), output_layouts=Replicate()),
        w,
        ids(10, (4, 5)),
        in_dim=0,
    ),
    "col_after_prepare_input": lambda w: io_parity(
        # A hook style and a sharding style on one module ("0" and the glob "[0]").
        lambda: nn.Sequential(nn.Embedding(10, 8, padding_idx=PAD)),
        {
            "[0]": PrepareModuleInput(
                input_layouts=Shard(0), desired_input_layouts=Replicate(), use_local_output=True
            ),
            "0": ColwiseParallel(output_layouts=Replicate()),
        },
        w,
        ids(10, (4, 5)),
        in_dim=0,
    ),
    # A whole tiny language model, sequence parallel between the layers.
    "tiny_lm": lambda w: io_parity(TinyLM, tiny_lm_plan(), w, ids(10, (2, 8))),
}


def _case(world: int, name: str) -> int:
    return CASES[name](world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_embedding_parity(pools, world, name):
    # Each body asserts parity itself and returns how many tensors it compared: every
    # rank must have compared the same non-zero number (none skipped a check).
    counts = pools(world).run(_case, world, name)
    assert len(counts) == world and counts[0] >= 1 and counts == [counts[0]] * world, counts


def _padding_row(world: int) -> list[float]:
    mesh = mesh_of(world)
    out = []
    for style in (RowwiseParallel(input_layouts=Replicate()), ColwiseParallel()):
        torch.manual_seed(0)
        m = parallelize_module(nn.Embedding(10, 8, padding_idx=PAD), mesh, style)
        y = m(torch.tensor([[PAD, 1, PAD, 9, 0]]))
        y.pow(2).sum().backward()
        grad = full(m.weight.grad)
        assert grad.shape == (10, 8) and grad[[0, 1, 9]].abs().sum() > 0
        out.append(grad[PAD].abs().sum().item())
    return out


def test_padding_row_gets_no_gradient(pools):
    for world in (2, 4):
        assert all(r == [0.0, 0.0] for r in pools(world).run(_padding_row, world))


# -- collective counts ------------------------------------------------------------------------
def _counts(world: int, name: str) -> tuple[dict[str, int], dict[str, int]]:
    torch.manual_seed(0)
    mesh = mesh_of(world)
    x = torch.randint(0, 10, (2, 8))
    styles = {
        "row": RowwiseParallel(input_layouts=Replicate()),
        "row_seq_out": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "row_torch_default": RowwiseParallel(),
        "col": ColwiseParallel(),
        "col_gathered": ColwiseParallel(output_layouts=Replicate()),
    }
    model = parallelize_module(nn.Embedding(10, 8), mesh, styles[name])
    return fwd_bwd_counts(model, x[:, : 8 // world] if name == "row_torch_default" else x)


EXPECTED = {
    "row": ({AR: 1}, {}),  # masked lookup, all-reduce; nothing in backward
    "row_seq_out": ({RS: 1}, {AG: 1}),
    "row_torch_default": ({AG: 1, AR: 1}, {}),  # ids gathered first (int: no backward)
    "col": ({}, {}),
    "col_gathered": ({AG: 1}, {}),  # backward: split
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedding_collective_counts(pools, world, name):
    for fwd, bwd in pools(world).run(_counts, world, name):
        assert (fwd, bwd) == EXPECTED[name]


def _outputs(world: int) -> None:
    mesh = mesh_of(world)
    x = torch.randint(0, 10, (2, 4))
    y = parallelize_module(nn.Embedding(10, 6), mesh, ColwiseParallel(use_local_output=False))(x)
    assert isinstance(y, DTensor) and y.placements == (Shard(2),) and y.shape == (2, 4, 6)
    y = parallelize_module(
        nn.Embedding(10, 6),
        mesh,
        RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
    )(x)
    assert isinstance(y, DTensor) and y.placements == (Replicate(),) and y.shape == (2, 4, 6)
    y = parallelize_module(
        nn.Embedding(10, 6),
        mesh,
        RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
    )(x)
    assert y.placements == (Shard(1),) and y.shape == (2, 4, 6)
    m = parallelize_module(nn.Embedding(10, 6), mesh, RowwiseParallel(input_layouts=Replicate()))
    rows = chunk_range(10, world, mesh.get_local_rank())[1]  # 3, 3, 3, 1 on 4 ranks
    assert m.weight.shape == (10, 6) and m.weight.to_local().shape == (rows, 6)


def test_embedding_outputs(pools):
    for world in (1, 2, 4):
        pools(world).run(_outputs, world)


# -- errors -----------------------------------------------------------------------------------
def _errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    done = parallelize_module(nn.Embedding(10, 8), mesh, RowwiseParallel())
    with CommDebugMode() as comms:
        msgs.append(
            expect_raises(
                NotImplementedError,
                parallelize_module,
                nn.Embedding(10, 8, max_norm=1.0),
                mesh,
                {"": RowwiseParallel()},
                match="max_norm",
            )
        )
        msgs.append(
            expect_raises(
                NotImplementedError,
                parallelize_module,
                nn.Embedding(10, 8, sparse=True),
                mesh,
                ColwiseParallel(),
                match="sparse",
            )
        )
        msgs.append(
            expect_raises(
                NotImplementedError,
                parallelize_module,
                nn.Embedding(10, 8, scale_grad_by_freq=True),
                mesh,
                RowwiseParallel(),
                match="scale_grad_by_freq",
            )
        )
        msgs.append(
            expect_raises(
                RuntimeError,
                parallelize_module,
                nn.EmbeddingBag(10, 8),
                mesh,
                RowwiseParallel(),
                match="Linear or torch.nn.Embedding",
            )
        )
        if world == 4:
            msgs.append(
                expect_raises(
                    ValueError,
                    parallelize_module,
                    nn.Embedding(3, 8),
                    mesh,
                    RowwiseParallel(),
                    match="Embedding: RowwiseParallel cannot shard num_embeddings=3 over 4",
                )
            )
            msgs.append(
                expect_raises(
                    ValueError,
                    parallelize_module,
                    TinyLM(10, 3),
                    mesh,
                    {"tok": ColwiseParallel()},
                    match="tok: .*embedding_dim=3 over 4",
                )
            )
        msgs.append(
            expect_raises(
                RuntimeError,
                parallelize_module,
                done,
                mesh,
                RowwiseParallel(),
                match="already parallelized",
            )
        )
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


@pytest.mark.parametrize("world", [2, 4])
def test_embedding_errors_on_every_rank(pools, world):
    results = pools(world).run(_errors, world, timeout=60)
    assert len({tuple(r) for r in results}) == 1 and len(results[0]) >= 5
