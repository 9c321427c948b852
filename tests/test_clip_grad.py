"""TP-aware clip_grad_norm_ equals torch's on the single-process reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from models import MLP
from shardwise import PairwiseParallel, clip_grad_norm_, parallelize_module
from shardwise.testing import expect_raises, full, mesh_of
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance

WORLDS = [1, 2, 4]
# (norm_type, max_norm, foreach): clipped with p=2, inf and 1; one not clipped (max_norm huge).
CASES = [(2.0, 0.5, None), (math.inf, 0.1, None), (1.0, 1.0, False), (2.0, 1e6, True)]


def _grads_of(world: int) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Reference and TP parameters (MLP + an unsharded extra) after one backward."""
    torch.manual_seed(0)
    ref = MLP()
    tp = parallelize_module(copy.deepcopy(ref), mesh_of(world), PairwiseParallel())
    ref_extra = nn.Parameter(torch.randn(5))
    tp_extra = nn.Parameter(ref_extra.detach().clone())
    x, w = torch.randn(4, 16), torch.randn(4, 16)
    ((ref(x) * w).sum() + ref_extra.pow(3).sum()).backward()
    ((full(tp(x)) * w).sum() + tp_extra.pow(3).sum()).backward()
    return {**dict(ref.named_parameters()), "extra": ref_extra}, {
        **dict(tp.named_parameters()),
        "extra": tp_extra,
    }


def _matches_torch(world: int) -> list[float]:
    totals = []
    for norm_type, max_norm, foreach in CASES:
        ref, tp = _grads_of(world)
        kinds = {
            name: type(p.grad.placements[0]).__name__
            for name, p in tp.items()
            if isinstance(p.grad, DTensor)
        }
        assert kinds == {
            "net1.weight": "Shard",
            "net1.bias": "Shard",
            "net2.weight": "Shard",
            "net2.bias": "Replicate",
        }, kinds
        expected = torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm, norm_type)
        with CommDebugMode() as comm:
            total = clip_grad_norm_(list(tp.values()), max_norm, norm_type, foreach=foreach)
        case = f"norm_type={norm_type}, max_norm={max_norm}"
        assert not isinstance(total, DTensor), case
        # The norm sums every gradient element (the longest reduction); then a division.
        tol = tolerance(torch.float32, reduction=sum(p.numel() for p in ref.values()))
        assert_close_at_scale(total, expected, tol=tol, scale=0.0, what=f"total norm, {case}")
        assert (expected > max_norm) == (max_norm < 1e6), (
            f"{case}: test must clip exactly when meant to"
        )
        for name, p in ref.items():
            assert_close_at_scale(
                full(tp[name].grad),
                p.grad,
                tol=tol,
                scale=largest_magnitude(g.grad for g in ref.values()),
                what=f"grad of {name}, {case}",
            )
        assert comm.get_total_counts() == (1 if world > 1 else 0), comm.get_comm_counts()
        totals.append(total.item())
    return totals


def _two_d_mesh(world: int) -> list[float]:
    """Shard on one mesh dim of two, and on both: each reduces over its shard dims only."""
    mesh = mesh_of(2, 2)
    gen = torch.Generator().manual_seed(1)
    layouts = [
        [Shard(0), Replicate()],
        [Replicate(), Shard(1)],
        [Shard(0), Shard(1)],
        [Replicate(), Replicate()],
    ]
    grads = [torch.randn(6, 5, generator=gen) for _ in layouts]
    totals = []
    for norm_type in (2.0, math.inf):
        params = []
        for g, placements in zip(grads, layouts, strict=True):
            p = nn.Parameter(
                distribute_tensor(torch.zeros(6, 5), mesh, placements, src_data_rank=None)
            )
            p.grad = distribute_tensor(g.clone(), mesh, placements, src_data_rank=None)
            params.append(p)
        refs = [nn.Parameter(torch.zeros(6, 5)) for _ in grads]
        for r, g in zip(refs, grads, strict=True):
            r.grad = g.clone()
        expected = torch.nn.utils.clip_grad_norm_(refs, 1.0, norm_type)
        with CommDebugMode() as comm:
            total = clip_grad_norm_(params, 1.0, norm_type)
        torch.testing.assert_close(total, expected)
        for p, r in zip(params, refs, strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), r.grad)
        # One group per shard-dims set: {dim 0}, {dim 1}, {dims 0 and 1} -> 1 + 1 + 2.
        assert comm.get_total_counts() == 4, comm.get_comm_counts()
        totals.append(total.item())
    return totals


def _edge_cases(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    partial = nn.Parameter(
        distribute_tensor(torch.zeros(4), mesh, [Replicate()], src_data_rank=None)
    )
    partial.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
    replicated = nn.Parameter(
        distribute_tensor(torch.zeros(3), mesh, [Replicate()], src_data_rank=None)
    )
    replicated.grad = distribute_tensor(
        torch.full((3,), 4.0), mesh, [Replicate()], src_data_rank=None
    )
    plain = nn.Parameter(torch.zeros(1))
    plain.grad = torch.tensor([-3.0])
    with CommDebugMode() as comm:
        msgs.append(
            expect_raises(ValueError, clip_grad_norm_, [plain, partial], 1.0, match="Partial")
        )
        msgs.append(
            expect_raises(ValueError, clip_grad_norm_, [plain], 1.0, norm_type=0, match="norm_type")
        )
        # Only replicated gradients: nothing to communicate. sqrt(3 * 16 + 9) = sqrt(57).
        total = clip_grad_norm_([plain, replicated], 1e6)
        assert torch.isclose(total, torch.tensor(57.0).sqrt()), total
        assert clip_grad_norm_([nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0  # no grads
        assert clip_grad_norm_(plain, 1.5).item() == 3.0  # a single tensor, clipped to 1.5
        # -3 x 1.5 / (3 + 1e-6): torch's clip coefficient adds 1e-6 to the norm.
        rel = 1e-6 / 3 + tolerance(torch.float32, reduction=2)
        assert torch.isclose(plain.grad, torch.tensor([-1.5]), rtol=rel, atol=0).all(), plain.grad
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    plain.grad = torch.tensor([float("nan")])
    msgs.append(
        expect_raises(
            RuntimeError,
            clip_grad_norm_,
            [plain, replicated],
            1.0,
            error_if_nonfinite=True,
            match="non-finite",
        )
    )
    return msgs


@pytest.mark.parametrize("world", WORLDS)
def test_clip_matches_torch(pools, world):
    totals = pools(world).run(_matches_torch, world)
    assert all(t == totals[0] for t in totals), totals


def test_clip_on_two_d_mesh(pools):
    totals = pools(4).run(_two_d_mesh, 4)
    assert all(t == totals[0] for t in totals), totals


@pytest.mark.parametrize("world", WORLDS)
def test_clip_edge_cases(pools, world):
    results = pools(world).run(_edge_cases, world, timeout=30)
    assert all(msgs == results[0] for msgs in results)


def _one_rank_without_replicated_grads(world: int) -> list[float]:
    """Rank 1 ran no backward through the replicated parameters: still one norm everywhere."""
    _, params = _grads_of(world)
    plain = [p for p in params.values() if not isinstance(p, DTensor)]
    assert plain, "the model must have replicated (plain) parameters"
    if torch.distributed.get_rank() == 1:
        for p in plain:
            p.grad = None
    return [clip_grad_norm_(list(params.values()), 1e9).item()]


def test_every_rank_gets_one_norm_when_a_rank_lacks_replicated_gradients(pools):
    totals = pools(2).run(_one_rank_without_replicated_grads, 2)
    assert totals[0] == totals[1], totals
