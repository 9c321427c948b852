"""Gradient-norm clipping for a model whose parameters mix DTensors and plain tensors.

``torch.nn.utils.clip_grad_norm_`` on a tensor-parallel model either fails on mixed
meshes or counts each replicated gradient once per rank. Here each gradient is
counted exactly once:

=========================================  ==============================================
gradient                                   contribution to ``total ** p``
=========================================  ==============================================
plain tensor (replicated on every rank)    local ``||g|| ** p``, no communication
DTensor, all ``Replicate``                 local ``||g|| ** p``, no communication
DTensor with ``Shard`` mesh dims           local ``||g|| ** p`` summed over the shard dims
DTensor with ``Partial``                   error: reduce it before clipping
=========================================  ==============================================

Sharded gradients are grouped by the process groups of their shard dims, so a 1-D
TP model costs one all-reduce (MAX instead of SUM for ``norm_type=inf``).

Example::

    >>> loss.backward()
    >>> total = clip_grad_norm_(model.parameters(), max_norm=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import get_total_norm

from ._engine.torch_compat import foreach_mul_

__all__ = ["clip_grad_norm_"]


def _split_grads(
    parameters: torch.Tensor | Iterable[torch.Tensor],
) -> tuple[
    list[torch.Tensor], list[torch.Tensor], dict[tuple[ProcessGroup, ...], list[torch.Tensor]]
]:
    """Local gradients: ``(all, counted once here, {shard groups: sharded})``."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    local_grads: list[torch.Tensor] = []
    replicated: list[torch.Tensor] = []
    sharded: dict[tuple[ProcessGroup, ...], list[torch.Tensor]] = {}
    for i, p in enumerate(params):
        grad = p.grad
        if grad is None:
            # No gradient here, but maybe on other ranks: a sharded parameter still names
            # its shard groups, so this rank joins their all-reduce (with nothing to add).
            if isinstance(p, DTensor):
                _shard_key(p, sharded)
            continue
        if not isinstance(grad, DTensor):
            local_grads.append(grad)
            replicated.append(grad)
            continue
        placements = tuple(grad.placements)
        if any(pl.is_partial() for pl in placements):
            raise ValueError(
                f"parameter {i} has a Partial gradient {placements}; reduce it "
                "(grad.redistribute(placements=[Replicate()])) before clipping."
            )
        local = grad.to_local()
        local_grads.append(local)
        # The parameter's layout, not the gradient's, picks the groups: it is the same on
        # every rank whether or not this rank has a gradient.
        key = _shard_key(p if isinstance(p, DTensor) else grad, sharded)
        if key is None:
            replicated.append(local)
        else:
            sharded[key].append(local)
    return local_grads, replicated, sharded


def _shard_key(
    t: DTensor, sharded: dict[tuple[ProcessGroup, ...], list[torch.Tensor]]
) -> tuple[ProcessGroup, ...] | None:
    """The process groups ``t`` is split over (registered in ``sharded``), or ``None``."""
    # Anything that is neither Replicate nor Partial splits the tensor (Shard, _StridedShard).
    shard_dims = [
        d for d, pl in enumerate(t.placements) if not isinstance(pl, Replicate) and not pl.is_partial()
    ]
    if not shard_dims:
        return None
    key = tuple(t.device_mesh.get_group(d) for d in shard_dims)
    sharded.setdefault(key, [])
    return key


def _scale_(grads: list[torch.Tensor], coef: torch.Tensor, foreach: bool | None) -> None:
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        c = coef.to(device)
        if foreach is False:
            for g in group:
                g.mul_(c)
        else:
            foreach_mul_(group, c)


def _with_replicated_share(
    part: torch.Tensor, replicated: torch.Tensor, norm_type: float, groups: tuple[ProcessGroup, ...]
) -> torch.Tensor:
    """``part`` plus this rank's share of the replicated gradients' norm, for one all-reduce.

    Replicated gradients count once. Summing ``norm**p / ranks`` over the ranks (the max,
    for the inf-norm) gives that once when every rank holds them, and the *same* total on
    every rank when some rank holds none (a branch it did not run), at no extra collective:
    the ranks then scale their gradients alike, and replicated copies stay equal.
    """
    if norm_type == math.inf:
        return torch.maximum(part, replicated)
    ranks = math.prod(dist.get_world_size(g) for g in groups)
    return part + replicated.pow(norm_type) / ranks


def _local_device(params: list[torch.Tensor]) -> torch.device:
    for p in params:
        if isinstance(p, DTensor):
            return p.to_local().device
    return params[0].device


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip gradients in place by their global norm over a tensor-parallel model.

    Same contract as :func:`torch.nn.utils.clip_grad_norm_`, with the norm taken over
    the *global* gradients: plain-tensor gradients (assumed equal on every rank) and
    ``Replicate`` DTensor gradients count once, ``Shard`` DTensor gradients are summed
    over their shards (one all-reduce per group of shard meshes). Every rank gets the
    same total and applies the same scale ``min(1, max_norm / (total + 1e-6))``.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` to clip; plain and DTensor mixed.
        max_norm: the largest allowed total norm.
        norm_type: ``p`` of the p-norm, ``> 0``, or ``math.inf``.

    Keyword Args:
        error_if_nonfinite: raise if the total norm is ``nan`` or ``inf``.
        foreach: use the ``torch._foreach`` kernels (``None``: yes).

    Returns:
        The total norm before clipping, a plain tensor equal on every rank.

    Every rank takes part in the same all-reduces whatever gradients it holds (a rank
    whose parameters have no ``.grad`` contributes nothing), so all ranks must pass the
    same parameters, as they hold the same model. The replicated gradients' norm travels
    in the first of those all-reduces, so every rank returns the same total even where
    some rank holds none of them.

    Example::

        >>> total = clip_grad_norm_(list(tp_model.parameters()) + [extra], max_norm=1.0)
    """
    norm_type = float(norm_type)
    if not (norm_type > 0 or norm_type == math.inf):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}.")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    local_grads, replicated, sharded = _split_grads(params)
    if not local_grads and not sharded:
        return torch.tensor(0.0)
    device = local_grads[0].device if local_grads else _local_device(params)
    is_inf = norm_type == math.inf
    op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
    replicated_norm = get_total_norm(replicated, norm_type, foreach=foreach).to(device)
    parts = [] if sharded else [replicated_norm]
    for k, (groups, grads) in enumerate(sharded.items()):
        # A rank without gradients in this group still takes part in its all-reduce.
        part = get_total_norm(grads, norm_type, foreach=foreach).to(device)
        part = part if is_inf else part.pow(norm_type)
        if k == 0:
            part = _with_replicated_share(part, replicated_norm, norm_type, groups)
        for group in groups:  # one collective per shard mesh dim: 1 on a 1-D TP mesh
            if dist.get_world_size(group) > 1:
                dist.all_reduce(part, op=op, group=group)
        parts.append(part if is_inf else part.pow(1.0 / norm_type))
    total = get_total_norm(parts, norm_type, foreach=False)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    _scale_(local_grads, coef, foreach)
    return total
