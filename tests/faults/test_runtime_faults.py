"""Runtime faults: inputs that differ between ranks, models that move, odd local state.

Each case asserts the exact outcome: the single-process answer, or the same error on
every rank within the pool's short timeout, after which the process group still works
(one all-reduce on every rank). Nothing may abort a process or hang.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.distributed as dist
from outcomes import TIMEOUT, group_works, outcome
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models import MLP
from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    SequenceParallel,
    clip_grad_norm_,
    parallelize_module,
)
from shardwise.debug import check_layouts
from shardwise.testing import full, mesh_of
from shardwise.testing.models import GPTStack, gpt_block_plan


# -- uneven and mismatched sequence shards ---------------------------------------------------
def _sequence_shards(world: int, lengths: list[int], batches: list[int]) -> tuple[str, str]:
    """SequenceParallel MLP fed per-rank pieces; compares with one process when it runs."""
    torch.manual_seed(0)
    ref = MLP()
    model = parallelize_module(copy.deepcopy(ref), mesh_of(world), SequenceParallel())
    rank = dist.get_rank()
    xs = [torch.randn(n, b, 16) for n, b in zip(lengths, batches)]
    mine = xs[rank].clone().requires_grad_()

    def run() -> None:
        y = model(mine)
        y.pow(2).sum().backward()
        x_ref = torch.cat(xs).requires_grad_()
        y_ref = ref(x_ref)
        y_ref.pow(2).sum().backward()
        start = sum(lengths[:rank])
        torch.testing.assert_close(y, y_ref[start : start + lengths[rank]])
        torch.testing.assert_close(mine.grad, x_ref.grad[start : start + lengths[rank]])
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(full(p.grad), p_ref.grad, msg=name)

    return outcome(run)


@pytest.mark.parametrize(
    ("world", "lengths"), [(2, [3, 2]), (4, [3, 3, 3, 1]), (4, [1, 1, 1, 0])]
)
def test_uneven_sequence_shards_compute_like_one_process(pools, world, lengths):
    # torch.chunk splits (what DTensor's Shard and the backward's reduce-scatter use).
    results = pools(world).run(_sequence_shards, world, lengths, [2] * world, timeout=TIMEOUT)
    assert results == [("ok", "")] * world


@pytest.mark.parametrize(
    ("lengths", "batches", "match"),
    [
        ([2, 3], [2, 2], r"lengths are \[2, 3\], which is not the torch.chunk split of 5"),
        ([3, 3], [2, 3], r"differ in a dimension other than 0 \(rank 0: \(3, 2, 16\), "
                         r"rank 1: \(3, 3, 16\)\)"),
        ([3, 2], [2, 3], r"differ in a dimension other than 0"),
    ],
)
def test_mismatched_sequence_shards_raise_on_every_rank(pools, lengths, batches, match):
    # These used to abort a gloo process (SIGABRT): now every rank raises the same error.
    results = pools(2).run(_sequence_shards, 2, lengths, batches, timeout=TIMEOUT)
    assert results[0] == results[1], results
    kind, message = results[0]
    assert kind == "ValueError"
    assert re.search(match, message), message


def _growing_then_shrinking(world: int) -> list[tuple[int, ...]]:
    """The gather's agreed capacity grows and shrinks with the pieces, on every rank alike."""
    torch.manual_seed(0)
    ref = MLP()
    model = parallelize_module(copy.deepcopy(ref), mesh_of(world), SequenceParallel())
    rank = dist.get_rank()
    shapes = []
    for total in (4, 9, 2, 9, 7):
        x = torch.randn(total, 2, 16)
        y = model(torch.chunk(x, world)[rank])
        torch.testing.assert_close(y, torch.chunk(ref(x), world)[rank])
        shapes.append(tuple(y.shape))
    return shapes


def test_sequence_lengths_may_change_between_steps(pools):
    results = pools(2).run(_growing_then_shrinking, 2, timeout=TIMEOUT)
    assert results[0] == [(2, 2, 16), (5, 2, 16), (1, 2, 16), (5, 2, 16), (4, 2, 16)]
    assert results[1] == [(2, 2, 16), (4, 2, 16), (1, 2, 16), (4, 2, 16), (3, 2, 16)]


def _layout_check_uneven(world: int) -> tuple[str, str]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    sp = parallelize_module(nn.Linear(8, 8), mesh_of(world), ColwiseParallel(input_layouts=Shard(0)))
    with check_layouts(sp):
        sp(torch.randn(3 - rank, 2, 8))  # 3 + 2: a torch.chunk split, accepted
        return outcome(lambda: sp(torch.randn(2 + rank, 2, 8)))


def test_check_layouts_names_the_chunk_split(pools):
    results = pools(2).run(_layout_check_uneven, 2, timeout=TIMEOUT)
    assert results[0] == results[1]
    assert results[0][0] == "ValueError"
    assert "lengths along dim 0 are [2, 3], not the torch.chunk split of 5 over 2 ranks: [3, 2]" in (
        results[0][1]
    )


def _layout_check_dtype(world: int) -> tuple[str, str]:
    torch.manual_seed(0)
    model = parallelize_module(MLP(), mesh_of(world), PairwiseParallel())
    x = torch.randn(4, 16)
    # A float64 input on one rank raised on that rank only (the others then failed with
    # "connection closed"); the debug mode checks it on every rank first.
    with check_layouts(model):
        return outcome(lambda: model(x.double() if dist.get_rank() == 1 else x))


def test_check_layouts_catches_a_dtype_on_one_rank(pools):
    results = pools(2).run(_layout_check_dtype, 2, timeout=TIMEOUT)
    assert results == [("ValueError", "'net1' (Linear): its input's dtype differs across the 2 "
                        "ranks of its TP group; every rank must pass the same dtype.")] * 2


# -- models that move after parallelize_module -----------------------------------------------
def _moves(world: int) -> list[str]:
    mesh = mesh_of(world)
    done = []
    torch.manual_seed(0)
    ref = MLP()
    x = torch.randn(4, 16)

    def check(model: nn.Module, reference: nn.Module, inp: torch.Tensor, what: str) -> None:
        x_tp, x_ref = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        y, y_ref = model(x_tp), reference(x_ref)
        y.sum().backward()
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref, msg=what)
        torch.testing.assert_close(x_tp.grad, x_ref.grad, msg=what)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            assert isinstance(p, DTensor) and p.dtype == p_ref.dtype, (what, name)
            torch.testing.assert_close(full(p.grad), p_ref.grad, msg=f"{what}: {name}")
        done.append(what)

    for what, move in [
        ("to(float64)", lambda m: m.to(torch.float64)),
        ("double()", lambda m: m.double()),
        ("to('cpu')", lambda m: m.to("cpu")),
    ]:
        model = parallelize_module(copy.deepcopy(ref), mesh, PairwiseParallel())
        model(x).sum().backward()  # a step before the move, with the parameters as installed
        model.zero_grad()
        model = move(model)
        reference = move(copy.deepcopy(ref))
        check(model, reference, x.to(next(reference.parameters()).dtype), what)
        check(model, reference, x.to(next(reference.parameters()).dtype), what + " again")

    # to_empty, then the weights loaded again: the meta-device build of shard-on-load.
    for what, build in [
        ("to_empty", lambda: copy.deepcopy(ref)),
        ("meta build + to_empty", lambda: _on_meta(MLP)),
    ]:
        model = parallelize_module(build(), mesh, PairwiseParallel())
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p, p_ref in zip(model.parameters(), ref.parameters()):
                p.copy_(distribute_tensor(p_ref.detach(), p.device_mesh, p.placements))
        check(model, ref, x, what)
        ref.zero_grad()

    # Replicated weights whose gradients are summed over the group (sequence-parallel
    # norms) keep that sum after a move: the sum belongs to the installed forward.
    for what, move in [("SP norms to(float64)", lambda m: m.to(torch.float64)),
                       ("SP norms to_empty", _refilled)]:
        torch.manual_seed(0)
        ref_sp = GPTStack(16, 2, 1).double()
        model = parallelize_module(copy.deepcopy(ref_sp).float(), mesh, {"blocks.*": gpt_block_plan(True)})
        model = move(model) if what.endswith("float64)") else move(model, ref_sp)
        xs = torch.randn(2 * world, 3, 16, dtype=torch.float64)
        mine = xs.chunk(world)[dist.get_rank()].clone().requires_grad_()
        model(mine).sum().backward()
        ref_sp(xs).sum().backward()
        for (name, p), p_ref in zip(model.named_parameters(), ref_sp.parameters()):
            torch.testing.assert_close(full(p.grad), p_ref.grad, msg=f"{what}: {name}")
        done.append(what)

    # Sequence parallelism under inference_mode (the shared entry cache needs no version).
    model = parallelize_module(copy.deepcopy(ref), mesh, SequenceParallel())
    xs = torch.randn(2 * world, 3, 16)
    with torch.inference_mode():
        y = model(xs.chunk(world)[dist.get_rank()])
        torch.testing.assert_close(y, ref(xs).chunk(world)[dist.get_rank()])
    done.append("inference_mode")
    return done


def _refilled(model: nn.Module, ref: nn.Module) -> nn.Module:
    """``to_empty`` in float64, then the reference's weights loaded into the shards."""
    model.to_empty(device="cpu")
    model.double()
    with torch.no_grad():
        for p, p_ref in zip(model.parameters(), ref.parameters()):
            p.copy_(distribute_tensor(p_ref.detach(), p.device_mesh, p.placements))
    return model


def _on_meta(cls: type[nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return cls()


def test_models_move_after_parallelize(pools):
    results = pools(2).run(_moves, 2, timeout=TIMEOUT)
    assert results[0] == results[1] == [
        "to(float64)", "to(float64) again", "double()", "double() again", "to('cpu')",
        "to('cpu') again", "to_empty", "meta build + to_empty", "SP norms to(float64)",
        "SP norms to_empty", "inference_mode",
    ]


# -- collectives that every rank must join -----------------------------------------------------
def _clip_without_local_grads(world: int) -> tuple[float, float]:
    torch.manual_seed(0)
    # Column-parallel with a plain input: no collective in forward or backward, so rank 0
    # can run a step alone.
    model = parallelize_module(nn.Linear(16, 32, bias=False), mesh_of(world), ColwiseParallel())
    if dist.get_rank() == 0:
        model(torch.randn(4, 16)).pow(2).sum().backward()
    local_sq = sum(
        float(p.grad.to_local().pow(2).sum()) for p in model.parameters() if p.grad is not None
    )
    total = clip_grad_norm_(model.parameters(), max_norm=1e9)
    assert group_works() == world
    return float(total), local_sq


def test_clip_grad_norm_joins_without_gradients(pools):
    # Rank 1 has no gradients: it still takes part in the all-reduce instead of returning
    # 0 at once (which left rank 0 waiting), and both ranks get the same global norm.
    (t0, sq0), (t1, sq1) = pools(2).run(_clip_without_local_grads, 2, timeout=TIMEOUT)
    assert sq1 == 0.0 and sq0 > 0
    assert t0 == t1
    assert math.isclose(t0, math.sqrt(sq0), rel_tol=1e-5)


def _cross_entropy_targets(world: int, case: str) -> tuple[str, str]:
    from shardwise import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = distribute_tensor(torch.randn(4, 8), mesh_of(world), [Shard(-1)])
    target = torch.tensor([0, 1, 2, 3])
    if dist.get_rank() == 1:
        target = torch.tensor([0, 1, 9, 3]) if case == "out of range" else torch.tensor([0, 1, 3, 2])
    return outcome(lambda: vocab_parallel_cross_entropy(logits, target))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("out of range", ("IndexError", "target values must be in [0, 8) or ignore_index=-100; "
                          "found 9 (on some rank of the vocabulary group; every rank raises this).")),
        ("differs", ("ValueError", "vocab_parallel_cross_entropy: target differs between the "
                     "ranks of the vocabulary group; every rank must pass the same (replicated) "
                     "target.")),
    ],
)
def test_cross_entropy_target_fault_on_one_rank_raises_everywhere(pools, case, expected):
    # Checked inside the row-max all-reduce: no extra collective, and rank 0 no longer
    # waits for a rank 1 that raised alone.
    assert pools(2).run(_cross_entropy_targets, 2, case, timeout=TIMEOUT) == [expected] * 2
