"""Vocabulary-parallel cross-entropy equals F.cross_entropy on the gathered logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import ColwiseParallel, parallelize_module, vocab_parallel_cross_entropy
from shardwise.testing import expect_raises, full, mesh_of
from shardwise.testing.comms import comm_counts
from shardwise.testing.tolerance import largest_magnitude, tolerance

IGNORE = -100
WORLDS = [1, 2, 4]
# (leading shape, V): the full grid on [B, S, V] with V=10 (uneven on 4 ranks), fewer
# cases for the others: V=5 on 4 ranks leaves rank 3 empty; () is one unbatched row.
FULL = ((2, 3), 10)
SHAPES = [((6,), 16), ((7,), 5), ((), 12)]
ALL_TARGETS = ("kept", "some ignored", "all ignored")


def _targets(lead: tuple[int, ...], vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    kept = torch.randint(vocab, lead, generator=gen)
    some = kept.clone()
    some.view(-1)[::3] = IGNORE
    return {"kept": kept, "some ignored": some, "all ignored": torch.full_like(kept, IGNORE)}


def _check_all(mesh, placements, lead, vocab, dtype=torch.float32, targets=ALL_TARGETS):
    """Every (targets, label_smoothing, reduction) against torch; returns losses and comm counts."""
    gen = torch.Generator().manual_seed(vocab * 10 + len(lead))
    x = (torch.randn(*lead, vocab, generator=gen) * 3).to(dtype)
    weight = torch.randn(lead, generator=gen)
    shard_world = mesh.size(len(placements) - 1)
    # Computed in float32 over every logit (the "sum" reduction is the longest sum), then
    # rounded once to the logits' dtype; relative to the scale of what is compared.
    rel = tolerance(torch.float32, reduction=x.numel()) + tolerance(dtype, reduction=1)

    def tol(expected: torch.Tensor) -> dict[str, float]:
        return {"atol": rel * largest_magnitude([expected.nan_to_num()]), "rtol": rel}
    losses, counts = [], set()
    for name, target in _targets(lead, vocab, gen).items():
        if name not in targets:
            continue
        for eps in (0.0, 0.1):
            for reduction in ("mean", "sum", "none"):
                case = f"{name}, eps={eps}, {reduction}, lead={lead}, V={vocab}"
                x_ref = x.detach().float().clone().requires_grad_()
                ref = F.cross_entropy(
                    x_ref.reshape(-1, vocab),
                    target.reshape(-1),
                    ignore_index=IGNORE,
                    label_smoothing=eps,
                    reduction=reduction,
                )
                ref = ref.reshape(lead) if reduction == "none" else ref
                x_tp = distribute_tensor(x, mesh, placements, src_data_rank=None).requires_grad_()
                with CommDebugMode() as fwd:
                    out = vocab_parallel_cross_entropy(
                        x_tp, target, ignore_index=IGNORE, label_smoothing=eps, reduction=reduction
                    )
                assert not isinstance(out, DTensor) and out.dtype == dtype, case
                assert out.shape == ref.shape, case
                torch.testing.assert_close(
                    out.float(),
                    ref.detach(),
                    equal_nan=True,
                    **tol(ref.detach()),
                    msg=lambda m, case=case: f"loss, {case}: {m}",
                )
                with CommDebugMode() as bwd:
                    (out.float() * weight).sum().backward()
                (ref * weight).sum().backward()
                grad = x_tp.grad.full_tensor()
                assert grad.dtype == dtype, case
                torch.testing.assert_close(
                    grad.float(),
                    x_ref.grad,
                    equal_nan=True,
                    **tol(x_ref.grad),
                    msg=lambda m, case=case: f"grad, {case}: {m}",
                )
                losses.append(out.detach())
                counts.add((tuple(comm_counts(fwd).items()), tuple(comm_counts(bwd).items())))
    expected = ((("allreduce_", 2),), ()) if shard_world > 1 else ((), ())
    assert counts == {expected}, (counts, shard_world)
    return losses, counts


def _matches_torch(world: int) -> list[torch.Tensor]:
    losses = _check_all(mesh_of(world), [Shard(-1)], *FULL)[0]
    for lead, vocab in SHAPES:
        losses += _check_all(mesh_of(world), [Shard(-1)], lead, vocab, targets=("some ignored",))[0]
    # Shard(ndim - 1) is the same placement as Shard(-1).
    losses += _check_all(mesh_of(world), [Shard(2)], *FULL, targets=("all ignored",))[0]
    return losses


def _bf16(world: int) -> int:
    return len(
        _check_all(
            mesh_of(world), [Shard(-1)], (4, 2), 10, dtype=torch.bfloat16, targets=("some ignored",)
        )[0]
    )


def _two_d_mesh(world: int) -> list[torch.Tensor]:
    # The vocabulary is sharded on the second mesh dim, the first replicates it.
    return _check_all(mesh_of(2, 2), [Replicate(), Shard(-1)], (5,), 10, targets=("some ignored",))[
        0
    ]


def _lm_head(world: int) -> list[torch.Tensor]:
    """A column-parallel head that keeps its DTensor output, trained through the loss."""
    torch.manual_seed(0)
    ref = nn.Linear(8, 12)
    tp = parallelize_module(
        copy.deepcopy(ref), mesh_of(world), ColwiseParallel(_prepare_output=None)
    )
    h, target = torch.randn(2, 3, 8), torch.randint(12, (2, 3))
    target[0, 1] = IGNORE
    expected = F.cross_entropy(ref(h).flatten(0, 1), target.flatten(), label_smoothing=0.1)
    loss = vocab_parallel_cross_entropy(tp(h), target, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    expected.backward()
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full(getattr(tp, name).grad), p.grad)
    return [loss.detach()]


def _errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    x = torch.randn(4, 8)
    sharded = distribute_tensor(x, mesh, [Shard(-1)], src_data_rank=None)
    target = torch.randint(8, (4,))
    ce = vocab_parallel_cross_entropy
    msgs = []
    with CommDebugMode() as comms:
        msgs.append(expect_raises(TypeError, ce, x, target, match="DTensor"))
        msgs.append(
            expect_raises(
                ValueError,
                ce,
                distribute_tensor(x, mesh, [Replicate()], src_data_rank=None),
                target,
                match="last .vocabulary. dim",
            )
        )
        msgs.append(
            expect_raises(
                ValueError,
                ce,
                distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None),
                target,
                match="Shard\\(-1\\)",
            )
        )
        msgs.append(
            expect_raises(
                ValueError,
                ce,
                DTensor.from_local(x, mesh, [Partial()], run_check=False),
                target,
                match="last .vocabulary. dim",
            )
        )
        msgs.append(expect_raises(ValueError, ce, sharded, target[:3], match="target shape"))
        msgs.append(expect_raises(ValueError, ce, sharded, target.view(2, 2), match="target shape"))
        msgs.append(expect_raises(TypeError, ce, sharded, target.float(), match="integer"))
        msgs.append(
            expect_raises(ValueError, ce, sharded, target, reduction="avg", match="reduction")
        )
        msgs.append(
            expect_raises(
                ValueError, ce, sharded, target, label_smoothing=1.5, match="label_smoothing"
            )
        )
        msgs.append(
            expect_raises(IndexError, ce, sharded, torch.tensor([0, 1, 8, 2]), match="found 8")
        )
        msgs.append(
            expect_raises(IndexError, ce, sharded, torch.tensor([0, -1, 1, 2]), match="found -1")
        )
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


def _same_on_every_rank(results: list[list[torch.Tensor]]) -> None:
    for rank, losses in enumerate(results[1:], 1):
        for a, b in zip(losses, results[0], strict=True):
            torch.testing.assert_close(
                a,
                b,
                equal_nan=True,
                atol=0,
                rtol=0,
                msg=lambda m, r=rank: f"rank {r} differs from rank 0: {m}",
            )


@pytest.mark.parametrize("world", WORLDS)
def test_matches_torch_cross_entropy(pools, world):
    results = pools(world).run(_matches_torch, world)
    assert len(results[0]) == 18 + 6 * (len(SHAPES) + 1)
    _same_on_every_rank(results)


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_logits(pools, world):
    assert pools(world).run(_bf16, world) == [6] * world


def test_vocab_sharded_on_second_mesh_dim(pools):
    _same_on_every_rank(pools(4).run(_two_d_mesh, 4))


@pytest.mark.parametrize("world", WORLDS)
def test_lm_head_parity(pools, world):
    _same_on_every_rank(pools(world).run(_lm_head, world))


@pytest.mark.parametrize("world", WORLDS)
def test_errors_before_any_collective(pools, world):
    results = pools(world).run(_errors, world, timeout=30)
    assert all(msgs == results[0] for msgs in results)
