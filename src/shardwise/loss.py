"""Vocabulary-parallel cross-entropy: the loss of logits sharded on the class dimension.

The output projection of a language model is column-parallel, so each rank holds
logits for a slice of the vocabulary. Gathering them would move ``[tokens, V]``
numbers per step; instead every rank reduces its slice to three numbers per token
and the ranks combine those:

=========================  ===========================================  ==============
step                       per token                                    communication
=========================  ===========================================  ==============
row max                    ``m = max_j x_j``                            all-reduce MAX
target logit, partition    ``x_t - m``, ``sum_j exp(x_j - m)``,         one all-reduce
function, sum of logits    ``sum_j (x_j - m)`` (label smoothing only)   SUM (stacked)
gradient                   ``softmax - (1-eps) one_hot - eps/V``        none
=========================  ===========================================  ==============

Two collectives per call, none in backward. The per-token loss is
``log Z - (1-eps) z_t - eps/V sum_j z_j`` with ``z = x - m``, so label smoothing uses
the *global* vocabulary size and the *global* sum of log-probabilities (Megatron-LM
uses the local ones, which makes the loss wrong and rank-dependent: Megatron-LM#737).

Example::

    >>> lm_head = parallelize_module(lm_head, mesh, ColwiseParallel(_prepare_output=None))
    >>> logits = lm_head(h)                       # DTensor [B, S, V], Shard(-1)
    >>> loss = vocab_parallel_cross_entropy(logits, labels, label_smoothing=0.1)
    >>> loss.backward()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate, Shard

from ._engine.collectives import chunk_range

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _all_reduce_(x: torch.Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup) -> None:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


def _vocab_slice(logits: DTensor) -> tuple[ProcessGroup, int, int]:
    """The group that shards the vocabulary and this rank's ``(start, vocab)`` in it."""
    last = logits.ndim - 1
    placements = tuple(logits.placements)
    vocab_dims = [
        d for d, p in enumerate(placements) if isinstance(p, Shard) and p.dim % logits.ndim == last
    ]
    others_ok = all(
        isinstance(p, Replicate) for d, p in enumerate(placements) if d not in vocab_dims
    )
    if len(vocab_dims) != 1 or not others_ok:
        raise ValueError(
            "vocab_parallel_cross_entropy expects logits sharded on the last (vocabulary) dim "
            "by exactly one mesh dim and replicated on the others, e.g. (Shard(-1),); "
            f"got {placements}. "
            "For an lm head, ColwiseParallel(_prepare_output=None) returns such a DTensor."
        )
    mesh_dim = vocab_dims[0]
    mesh = logits.device_mesh
    vocab = logits.shape[-1]
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    start, expected = chunk_range(vocab, world, rank)  # torch.chunk's split
    if logits.to_local().shape[-1] != expected:
        raise ValueError(
            f"rank {rank} of {world} holds {logits.to_local().shape[-1]} vocabulary entries but "
            f"torch.chunk sharding of V={vocab} gives {expected}; build logits with "
            "distribute_tensor or DTensor.from_local(..., shape=...) in chunk layout."
        )
    return mesh.get_group(mesh_dim), start, vocab


def _check_target(
    target: torch.Tensor, logits: DTensor, ignore_index: int, vocab: int
) -> torch.Tensor:
    if isinstance(target, DTensor):
        if not all(isinstance(p, Replicate) for p in target.placements):
            raise ValueError(
                f"target must be replicated, got placements {tuple(target.placements)}"
            )
        target = target.to_local()
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        what = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(
            f"target must be an integer tensor of class indices, got {what} "
            "(class-probability targets are not supported)."
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the leading shape "
            f"{tuple(logits.shape[:-1])} of logits {tuple(logits.shape)}."
        )
    # target is the same on every rank, so this check agrees everywhere (no collective).
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise IndexError(
            f"target values must be in [0, {vocab}) or ignore_index={ignore_index}; "
            f"found {target[bad][0].item()}."
        )
    return target


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from this rank's vocabulary slice; ignored tokens give 0."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # [..., V/W] this rank's logits
        target: torch.Tensor,  # [...] global class ids
        group: ProcessGroup,
        start: int,
        vocab: int,
        ignore_index: int,
        eps: float,
    ) -> torch.Tensor:
        in_dtype, x = x.dtype, x.float()
        local_vocab = x.shape[-1]
        if local_vocab:
            row_max = x.amax(dim=-1)  # [...]
        else:  # an empty tail shard (V < W * ceil(V / W))
            row_max = torch.full(x.shape[:-1], float("-inf"), device=x.device)
        _all_reduce_(row_max, dist.ReduceOp.MAX, group)
        z = x - row_max.unsqueeze(-1)  # [..., V/W], <= 0
        valid = target != ignore_index
        local_t = target - start
        mine = valid & (local_t >= 0) & (local_t < local_vocab)  # this rank holds the target
        local_t = torch.where(mine, local_t, 0)
        exp = z.exp()
        parts = [exp.sum(dim=-1)]  # partition function Z
        if local_vocab:
            z_t = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
            parts.append(torch.where(mine, z_t, 0.0))
        else:
            parts.append(torch.zeros_like(row_max))
        if eps:
            parts.append(z.sum(dim=-1))
        stats = torch.stack(parts, dim=-1)  # [..., 2 or 3]
        _all_reduce_(stats, dist.ReduceOp.SUM, group)
        log_z = stats[..., 0].log()
        loss = log_z - (1.0 - eps) * stats[..., 1]
        if eps:
            loss = loss - (eps / vocab) * stats[..., 2]
        loss = torch.where(valid, loss, 0.0)
        softmax = exp.div_(stats[..., :1])  # [..., V/W], reuses the exp buffer
        ctx.save_for_backward(softmax, local_t, mine, valid)
        ctx.eps, ctx.vocab, ctx.in_dtype = eps, vocab, in_dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_t, mine, valid = ctx.saved_tensors
        eps, vocab = ctx.eps, ctx.vocab
        # where, not multiply: a mean over zero tokens sends inf here for ignored rows.
        g = torch.where(valid, grad_loss.float(), 0.0)  # [...]
        grad = softmax * g.unsqueeze(-1)  # [..., V/W]
        if softmax.shape[-1]:
            hit = torch.where(mine, g * (eps - 1.0), 0.0)  # -(1 - eps) at the target column
            grad.scatter_add_(-1, local_t.unsqueeze(-1), hit.unsqueeze(-1))
        if eps:
            grad.sub_((eps / vocab) * g.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: DTensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocabulary-sharded logits, without gathering them.

    Equals ``F.cross_entropy(logits.full_tensor().flatten(0, -2), target.flatten(), ...)``
    (reshaped to ``target``'s shape for ``reduction="none"``) in value and in the
    gradient of ``logits``. Two collectives in forward (an all-reduce MAX and one stacked
    all-reduce SUM), none in backward. Computed in float32; returned in ``logits.dtype``.

    Args:
        logits: a DTensor ``[..., V]`` sharded on its last dim (``Shard(-1)``) by one mesh
            dim and replicated on any others. Uneven shards (``torch.chunk`` layout) work.
        target: class ids ``[...]`` (the leading shape of ``logits``), the same on every
            rank: a plain integer tensor or a replicated DTensor.

    Keyword Args:
        ignore_index: target value that contributes neither loss nor gradient; ``mean``
            averages over the other tokens (``nan`` if there are none, as in torch).
        label_smoothing: ``eps`` in ``[0, 1]``; the target is ``(1 - eps) one_hot + eps / V``
            over the full vocabulary ``V``.
        reduction: ``"mean"``, ``"sum"`` (scalars) or ``"none"`` (``target``'s shape).

    Returns:
        A plain tensor, the same on every rank of the mesh.

    Example::

        >>> logits = distribute_tensor(torch.randn(8, 32000), mesh, [Shard(-1)])
        >>> loss = vocab_parallel_cross_entropy(logits, torch.randint(32000, (8,)))
    """
    if not isinstance(logits, DTensor):
        raise TypeError(
            f"logits must be a DTensor sharded on the vocabulary dim, got {type(logits).__name__}; "
            "for a plain tensor use torch.nn.functional.cross_entropy."
        )
    if logits.ndim < 1:
        raise ValueError("logits must have a vocabulary dim; got a 0-d DTensor.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    group, start, vocab = _vocab_slice(logits)
    target = _check_target(target, logits, ignore_index, vocab)
    loss: torch.Tensor = _VocabParallelCrossEntropy.apply(
        logits.to_local(), target, group, start, vocab, ignore_index, float(label_smoothing)
    )  # [...] replicated
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (target != ignore_index).sum()
    return loss.to(logits.dtype)
