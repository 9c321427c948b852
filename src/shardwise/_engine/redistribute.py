"""Placement transitions on plain local tensors, one autograd-aware collective each.

Parallelized modules and the ``PrepareModule*`` hooks describe their inputs and outputs
with DTensor placements but compute on local tensors. :func:`local_redistribute` turns
a transition into at most one collective from :mod:`shardwise._engine.collectives`; for the
transitions it has no recipe for it returns ``None`` and the caller falls back to
DTensor's ``redistribute`` (same values, more overhead).

=========================  ======================  ==========================================
from -> to                 forward                 backward
=========================  ======================  ==========================================
X -> X                     nothing                 nothing (all-reduce if ``partial_grad``
                                                   and X is ``Replicate``: Megatron's *f*)
``Shard(d)`` -> Replicate  all-gather on d         split on d, or reduce-scatter on d if
                                                   ``partial_grad``
Replicate -> ``Shard(d)``  split on d              all-gather on d
Partial -> Replicate       all-reduce              nothing
Partial -> ``Shard(d)``    reduce-scatter on d     all-gather on d
=========================  ======================  ==========================================

``partial_grad`` says who consumes the result: column-parallel compute (and DTensors
whose gradient placement is ``Partial``) hands back each rank's share of the gradient,
which must be summed; anything else hands back the full gradient on every rank.

Example::

    >>> x_full = local_redistribute(x_seq, group, Shard(1), Replicate())  # [B,S/W,H] -> [B,S,H]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Shard

from . import collectives as C
from .io import ModuleIO, normalize

__all__ = ["global_shape", "input_to_local", "local_redistribute", "output_from_local", "wrap"]


def _is_sum(p: Placement) -> bool:
    return type(p) is Partial and p.reduce_op == "sum"


def local_redistribute(
    x: torch.Tensor,
    group: ProcessGroup,
    src: Placement,
    dst: Placement,
    *,
    size: int | None = None,
    partial_grad: bool = False,
    may_overwrite: bool = False,
) -> torch.Tensor | None:
    """``x`` (this rank's piece in layout ``src``) as this rank's piece in layout ``dst``.

    Returns ``None`` when there is no single-collective recipe (``Shard -> Shard``,
    anything ``-> Partial``, non-sum partials). ``size`` is the global length of ``src``'s
    shard dimension when the pieces may be uneven. ``may_overwrite`` lets an all-reduce
    reuse ``x``'s memory (pass it for fresh intermediates only).

    Example::

        >>> y = local_redistribute(partial, group, Partial(), Shard(1), may_overwrite=True)
    """
    src, dst = normalize(src, x.ndim), normalize(dst, x.ndim)
    if src == dst:
        return C.copy_to_region(x, group) if partial_grad and dst.is_replicate() else x
    if type(src) is Shard and dst.is_replicate():
        gather = C.gather_from_sequence_region if partial_grad else C.gather_from_region
        return gather(x, group, src.dim, size)
    if src.is_replicate() and type(dst) is Shard:
        return C.scatter_to_region(x, group, dst.dim)
    if _is_sum(src) and dst.is_replicate():
        return C.reduce_from_region(x if may_overwrite else x.clone(), group)
    if _is_sum(src) and type(dst) is Shard:
        return C.reduce_scatter_to_sequence_region(x, group, dst.dim)
    return None


def global_shape(
    x: torch.Tensor, placement: Placement, world: int, size: int | None = None
) -> list[int]:
    """The global shape of ``x`` held in ``placement`` (``size``: the sharded dim's length).

    Without ``size`` a shard is assumed even, as ``DTensor.from_local`` assumes.

    Example::

        >>> global_shape(torch.ones(2, 3), Shard(1), world=4)
        [2, 12]
    """
    shape = list(x.shape)
    placement = normalize(placement, x.ndim)
    if type(placement) is Shard:
        shape[placement.dim] = size if size is not None else shape[placement.dim] * world
    return shape


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def wrap(
    local: torch.Tensor,
    mesh: DeviceMesh,
    placement: Placement,
    shape: Sequence[int],
    grad_placements: Sequence[Placement] | None = None,
) -> DTensor:
    """``DTensor.from_local`` with an explicit global ``shape`` (uneven shards stay right).

    Example::

        >>> wrap(y_local, mesh, Shard(2), [4, 5, 6])   # 4 ranks hold 2, 2, 2, 0 of the last dim
    """
    return DTensor.from_local(
        local,
        mesh,
        [normalize(placement, local.ndim)],
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_strides(shape),
        grad_placements=grad_placements,
    )


def input_to_local(
    x: Any, io: ModuleIO, desired: Placement, mesh: DeviceMesh, *, partial_grad: bool = False
) -> Any:
    """A module's input as the local tensor of layout ``desired`` it computes on.

    Plain tensors take :func:`local_redistribute`; DTensors, user functions and
    transitions without a local recipe go through DTensor.

    Example::

        >>> x_local = input_to_local(x, ModuleIO(Replicate(), Partial()), Shard(-1), mesh)
    """
    if io.input_fn is not None:
        dt = io.input_fn(x, mesh)
    elif isinstance(x, DTensor):
        dt = x
    elif isinstance(x, torch.Tensor):
        if io.input_layout is None:
            return x
        group = mesh.get_group()
        local = local_redistribute(x, group, io.input_layout, desired, partial_grad=partial_grad)
        if local is not None:
            return local
        dt = DTensor.from_local(x, mesh, [normalize(io.input_layout, x.ndim)], run_check=False)
    else:
        raise RuntimeError(
            f"Tensor parallel module expects torch.Tensor or DTensor input but received {type(x)}!"
        )
    target = normalize(desired, dt.ndim)
    if tuple(dt.placements) != (target,):
        dt = dt.redistribute(mesh, [target])
    # Column-parallel compute leaves a partial input gradient: say so, and DTensor sums it.
    return dt.to_local(
        grad_placements=[Partial()] if partial_grad and target.is_replicate() else None
    )


def output_from_local(
    y: torch.Tensor, natural: Placement, io: ModuleIO, mesh: DeviceMesh, *, size: int | None = None
) -> Any:
    """A module's local result ``y`` (layout ``natural``) in the layout the caller asked for.

    ``size`` is the global length of ``natural``'s shard dimension (uneven shards). ``y``
    must be a fresh intermediate: an all-reduce may overwrite it.

    Example::

        >>> out = output_from_local(y, Shard(-1), ModuleIO(Replicate(), Replicate()), mesh, size=6)
    """
    natural = normalize(natural, y.ndim)
    shape = global_shape(y, natural, mesh.size(), size)
    if io.output_fn is not None:
        return io.output_fn(wrap(y, mesh, natural, shape), mesh)
    dst = normalize(io.output_layout, y.ndim)
    out = local_redistribute(
        y,
        mesh.get_group(),
        natural,
        dst,
        size=shape[natural.dim] if type(natural) is Shard else None,
        may_overwrite=True,
    )
    if out is None:
        dt = wrap(y, mesh, natural, shape).redistribute(mesh, [dst])
        return dt.to_local() if io.use_local_output else dt
    return out if io.use_local_output else wrap(out, mesh, dst, shape)
