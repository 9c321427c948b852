"""A debug-mode check that inputs really have the layouts their modules declare.

A column-parallel layer trusts that its input is the same on every rank of its TP group
(``Replicate``); a row-parallel one that each rank holds its own slice. Nothing checks
this on the hot path, so feeding TP ranks different batches (a common data-parallel
mistake) gives wrong results without any error. :func:`check_layouts` adds that check
for as long as it is active: before each parallelized module runs, its TP group
compares a fingerprint of the input (shape, and for ``Replicate`` also the values) with
one all-reduce. A mismatch raises ``ValueError`` naming the module, on every rank of
the group at once, so nothing hangs. It costs a collective per module call: use it to
debug, not to train.

Example::

    >>> with check_layouts(model):
    ...     loss = model(x).sum()     # raises if TP ranks were fed different x
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Placement, Shard

from ._engine.collectives import chunk_range
from ._engine.forward import installed_forward

__all__ = ["LayoutCheck", "check_layouts"]

_MAX_DIMS = 8  # shape entries compared; a tensor with more dims compares its numel too


@dataclass(frozen=True)
class _Declared:
    fqn: str
    module: nn.Module
    placement: Placement
    group: ProcessGroup

    @property
    def label(self) -> str:
        kind = type(self.module).__name__
        return f"'{self.fqn}' ({kind})" if self.fqn else kind


def _declared_inputs(model: nn.Module) -> Iterator[_Declared]:
    """Every parallelized module whose plain input has a declared layout."""
    for fqn, module in model.named_modules():
        fwd = installed_forward(module)
        if fwd is None or fwd.input_layout is None or dist.get_world_size(fwd.group) == 1:
            continue
        yield _Declared(fqn, module, fwd.input_layout, fwd.group)


def _shape_code(x: torch.Tensor, free_dim: int | None) -> list[float]:
    """ndim, each size (``-1`` at the sharded dim and past the last dim), numel, dtype."""
    sizes = [float(s) for s in x.shape[:_MAX_DIMS]]
    if free_dim is not None and free_dim < len(sizes):
        sizes[free_dim] = -1.0
    sizes += [-1.0] * (_MAX_DIMS - len(sizes))
    dtype = float(zlib.crc32(str(x.dtype).encode()))  # the same number on every rank
    return [float(x.dim()), *sizes, float(x.numel()) if free_dim is None else -1.0, dtype]


def _value_code(x: torch.Tensor) -> list[float]:
    """Order-sensitive sums of the values (NaN/inf mapped to finite stand-ins)."""
    v = torch.nan_to_num(x.detach().reshape(-1).to(torch.float64), nan=7.0, posinf=1e300, neginf=-1e300)
    weights = torch.arange(v.numel(), dtype=torch.float64).remainder_(7919).add_(1.0)
    return [v.sum().item(), (v * v).sum().item(), (v * weights).sum().item()]


class LayoutCheck:
    """Forward pre-hooks checking declared input layouts (see :func:`check_layouts`).

    ``checked`` counts the inputs checked so far.
    """

    def __init__(self, model: nn.Module) -> None:
        self.checked = 0
        self._handles = [
            d.module.register_forward_pre_hook(self._hook_for(d)) for d in _declared_inputs(model)
        ]
        if not self._handles:
            raise ValueError(
                f"check_layouts: {type(model).__name__} has no parallelized module with a "
                "declared input layout (parallelize it first)."
            )

    def _hook_for(self, declared: _Declared) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
                self._check(declared, x)

        return hook

    def _check(self, d: _Declared, x: torch.Tensor) -> None:
        replicate = d.placement.is_replicate()
        world, rank = dist.get_world_size(d.group), dist.get_rank(d.group)
        free_dim = d.placement.dim % max(x.dim(), 1) if isinstance(d.placement, Shard) else None
        shape = _shape_code(x, free_dim)
        if replicate:
            extra = _value_code(x)
        else:  # each rank's length along the sharded dim, in its own slot (MAX collects them)
            extra = [-1.0] * world
            extra[rank] = float(x.shape[free_dim]) if free_dim is not None and x.dim() else 0.0
        code = torch.tensor(shape + extra, dtype=torch.float64)
        both = torch.cat([code, -code])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=d.group)
        high, low = both[: len(code)], -both[len(code) :]
        self.checked += 1
        n = len(shape)
        if high[n - 1] != low[n - 1]:
            raise ValueError(
                f"{d.label}: its input's dtype differs across the {world} ranks of its TP group; "
                "every rank must pass the same dtype."
            )
        if not torch.equal(high[:n], low[:n]):
            dims = [
                f"dim {i - 1}: {int(lo)}..{int(hi)}"
                for i, (hi, lo) in enumerate(zip(high[1 : _MAX_DIMS + 1], low[1 : _MAX_DIMS + 1]), 1)
                if hi != lo
            ]
            ndim = "" if high[0] == low[0] else f" (ndim {int(low[0])}..{int(high[0])})"
            what = "the same tensor on every rank" if replicate else f"this rank's slice along dim {free_dim}"
            raise ValueError(
                f"{d.label}: its input is declared {d.placement!r} ({what}), but its shape differs "
                f"across the {world} ranks of its TP group{ndim}: {', '.join(dims) or 'numel'}."
            )
        if replicate and not torch.equal(high, low):
            raise ValueError(
                f"{d.label}: its input is declared Replicate (the same tensor on every rank), but "
                f"the values differ across the {world} ranks of its TP group. With data "
                "parallelism, give every rank of a TP group the same batch; a sharded input "
                "must be declared (e.g. input_layouts=Shard(1))."
            )
        if not replicate:
            lengths = [int(v) for v in high[n:]]
            total = sum(lengths)
            # Local shards and gathered ones alike take torch.chunk lengths (3 + 2 for 5 on
            # 2 ranks): gathers learn each rank's length (shardwise.sized_gather).
            want = [chunk_range(total, world, r)[1] for r in range(world)]
            rule = f"the torch.chunk split of {total} over {world} ranks"
            if lengths != want:
                raise ValueError(
                    f"{d.label}: its input is declared {d.placement!r}, but the ranks' lengths "
                    f"along dim {free_dim} are {lengths}, not {rule}: {want}."
                )

    def remove(self) -> None:
        """Remove the hooks (what leaving the ``with`` block does)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayoutCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_layouts(model: nn.Module) -> LayoutCheck:
    """Check, while active, that each parallelized module's input has its declared layout.

    Covers column- and row-parallel Linears and Embeddings (their ``input_layouts`` or
    seed input functions), and the HF Conv1D and head-sliced projections. ``Replicate``
    inputs must match in shape and values across the TP group; ``Shard(d)`` inputs in
    every dimension but ``d``. Each check is one all-reduce; mismatches raise
    ``ValueError`` on every rank of the group.

    Example::

        >>> model = parallelize_module(model, mesh, PairwiseParallel())
        >>> with check_layouts(model) as check:
        ...     model(x)
        >>> check.checked
        2
    """
    return LayoutCheck(model)
