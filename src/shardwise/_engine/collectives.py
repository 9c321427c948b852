"""Autograd-aware collectives on local tensors: the f/g operators of Megatron-LM.

Every function here takes a plain ``torch.Tensor`` and a ``ProcessGroup`` and runs
exactly one collective in forward and at most one in backward. They are the only
place in shardwise's hot path that communicates, so counting them is counting the
library's traffic.

======================================  =======================  ========================
function                                forward                  backward
======================================  =======================  ========================
``copy_to_region``            (f)       identity                 all-reduce
``reduce_from_region``        (g)       all-reduce               identity
``gather_from_region``                  all-gather on ``dim``    split on ``dim``
``scatter_to_region``                   split on ``dim``         all-gather on ``dim``
``gather_from_sequence_region``         all-gather on ``dim``    reduce-scatter on ``dim``
``reduce_scatter_to_sequence_region``   reduce-scatter ``dim``   all-gather on ``dim``
======================================  =======================  ========================

Shards follow ``torch.chunk`` (DTensor's ``Shard``): pieces of ``ceil(n / W)``, the
last ones shorter or empty. Gathers that may see uneven pieces take the global
``size`` of the dimension; reduce-scatters and splits work it out from the full input.

Example::

    >>> y = copy_to_region(x, group)          # replicated input to a column-parallel matmul
    >>> out = reduce_from_region(partial, group)   # sum the row-parallel partial results
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .sized_gather import gather_sized, takes_sized_gather
from .torch_compat import all_gather_single

__all__ = [
    "all_gather_along",
    "chunk_range",
    "copy_to_region",
    "gather_from_region",
    "gather_from_sequence_region",
    "reduce_from_region",
    "reduce_scatter_along",
    "reduce_scatter_to_sequence_region",
    "scatter_to_region",
    "split_along",
]

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def chunk_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, length)`` of ``rank``'s piece when ``size`` is split like ``torch.chunk``.

    Example::

        >>> [chunk_range(10, 4, r) for r in range(4)]
        [(0, 3), (3, 3), (6, 3), (9, 1)]
    """
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(chunk, size - start)


def _pad_rows(xt: torch.Tensor, rows: int) -> torch.Tensor:
    if xt.shape[0] == rows:
        return xt
    return torch.cat([xt, xt.new_zeros((rows - xt.shape[0], *xt.shape[1:]))])


def all_gather_along(
    x: torch.Tensor, group: ProcessGroup, dim: int, size: int | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (one all-gather).

    ``size`` is the global length of ``dim`` when the pieces may be uneven (chunk
    layout); ``None`` means every rank holds the same length.

    Example::

        >>> full = all_gather_along(shard, group, dim=0)          # [S/W, B, H] -> [S, B, H]
        >>> full = all_gather_along(shard, group, dim=-1, size=6)  # 4 ranks hold 2, 2, 2, 0
    """
    world = dist.get_world_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    # Gather into a buffer stacked on a new leading axis, then move it next to ``dim``.
    xt = x.movedim(dim, 0).contiguous()
    chunk = xt.shape[0] if size is None else -(-size // world)
    # In chunk layout only the tail is short, so the padding lands after row ``size``.
    xt = _pad_rows(xt, chunk)
    out = torch.empty((world * chunk, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, xt, group=group)
    if size is not None and size != out.shape[0]:
        out = out[:size]
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk of ``dim`` (one reduce-scatter).

    A length ``W`` does not divide is split like ``torch.chunk`` (padded on the wire).

    Example::

        >>> mine = reduce_scatter_along(partial, group, dim=0)   # [S, B, H] -> [S/W, B, H]
    """
    world = dist.get_world_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    xt = x.movedim(dim, 0).contiguous()
    size = xt.shape[0]
    chunk = -(-size // world)
    xt = _pad_rows(xt, world * chunk)
    out = torch.empty((chunk, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, xt, group=group)
    _, length = chunk_range(size, world, dist.get_rank(group))
    if length != chunk:
        out = out[:length]
    return out.movedim(0, dim)


def split_along(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's ``torch.chunk`` piece of ``x`` along ``dim`` (no communication).

    Example::

        >>> mine = split_along(full, group, dim=-1)   # [B, S, H] -> [B, S, H/W]
    """
    world = dist.get_world_size(group)
    if world == 1:
        return x
    start, length = chunk_range(x.shape[dim], world, dist.get_rank(group))
    return x.narrow(dim, start, length).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # An alias, not a view: the result must not keep ``x`` alive (see sharded_linear).
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        if dist.get_world_size(group) == 1:
            return x.view_as(x)
        if x.is_contiguous():
            # Reduce in place, as Megatron does: the partial sum is dead after this.
            ctx.mark_dirty(x)
            dist.all_reduce(x, group=group)
            return x
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _gather(x: torch.Tensor, group: ProcessGroup, dim: int, size: int | None) -> torch.Tensor:
    """``all_gather_along``; with an unknown ``size`` on gloo (CPU), :func:`gather_sized`."""
    if (
        size is None
        and takes_sized_gather(x, group)
        and dist.get_world_size(group) > 1
        and not torch.compiler.is_compiling()
    ):
        # Pieces whose lengths the caller cannot vouch for (a user's sequence split): the
        # sized gather takes uneven torch.chunk pieces and raises on every rank, instead
        # of letting gloo abort the process, when the ranks' pieces do not fit together.
        # (Compiled graphs keep the plain gather: the sized one reads sizes on the host.)
        return gather_sized(x, group, dim)
    return all_gather_along(x, group, dim, size)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: ProcessGroup, dim: int, size: int | None
    ) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return split_along(grad, ctx.group, ctx.dim), None, None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_along(grad, ctx.group, ctx.dim, ctx.size), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: ProcessGroup, dim: int, size: int | None
    ) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return reduce_scatter_along(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        return reduce_scatter_along(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_along(grad, ctx.group, ctx.dim, ctx.size), None, None


def copy_to_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Megatron's *f*: identity in forward, all-reduce of the gradient in backward.

    Use it where a replicated activation enters column-parallel compute: each rank's
    gradient then holds only its output slice's contribution and must be summed.

    Example::

        >>> y = torch.nn.functional.linear(copy_to_region(x, group), w_col_shard)
    """
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Megatron's *g*: all-reduce (sum) in forward, identity in backward.

    Example::

        >>> out = reduce_from_region(torch.nn.functional.linear(x_shard, w_row_shard), group)
    """
    return _ReduceFromRegion.apply(x, group)


def gather_from_region(
    x: torch.Tensor, group: ProcessGroup, dim: int = -1, size: int | None = None
) -> torch.Tensor:
    """All-gather along ``dim`` in forward; keep this rank's slice of the gradient in backward.

    The gradient is assumed replicated (every rank computes the same loss from the
    gathered tensor), as for a column-parallel layer whose output is gathered. ``size``
    is the global length of ``dim`` when pieces may be uneven (``torch.chunk`` layout);
    without it, CPU tensors go through :func:`shardwise._engine.sized_gather.gather_sized`, which
    learns the lengths in the same collective and raises on every rank if they do not fit.

    Example::

        >>> full = gather_from_region(y_shard, group, dim=-1)   # [.., H/W] -> [.., H]
    """
    return _GatherFromRegion.apply(x, group, dim, size)


def scatter_to_region(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice along ``dim`` in forward; all-gather the gradient in backward.

    Example::

        >>> x_shard = scatter_to_region(x_full, group, dim=-1)   # [.., H] -> [.., H/W]
    """
    return _ScatterToRegion.apply(x, group, dim)


def gather_from_sequence_region(
    x: torch.Tensor, group: ProcessGroup, dim: int = 0, size: int | None = None
) -> torch.Tensor:
    """Sequence parallel entry: all-gather ``dim`` forward, reduce-scatter the gradient backward.

    The gradient is assumed partial (each rank's consumers saw only their share), so the
    reduce-scatter both sums and splits it. ``size`` as in :func:`gather_from_region`.

    Example::

        >>> x_full = gather_from_sequence_region(x_seq_shard, group, dim=0)   # [S/W,B,H] -> [S,B,H]
    """
    return _GatherFromSequenceRegion.apply(x, group, dim, size)


def reduce_scatter_to_sequence_region(
    x: torch.Tensor, group: ProcessGroup, dim: int = 0
) -> torch.Tensor:
    """Sequence parallel exit: reduce-scatter ``dim`` forward, all-gather the gradient backward.

    Example::

        >>> y_shard = reduce_scatter_to_sequence_region(partial, group, dim=0)  # [S,B,H] -> [S/W,B,H]
    """
    return _ReduceScatterToSequenceRegion.apply(x, group, dim)
