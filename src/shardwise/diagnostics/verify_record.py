"""What :func:`shardwise.verify` records on each copy of a model, and how it compares pieces.

A :class:`Recorder` hooks every submodule of a model and records, in execution order,
each module's input, its output, and (through a tensor hook on that output) the
gradient that arrives at the output in backward. On the parallel copy these are this
rank's pieces, each with its layout when one is known: a DTensor's placement, or the
layout a parallelized module declares for its plain input or output. Otherwise the
layout is inferred from the shapes of all ranks' pieces (:func:`assemble`).

Example::

    >>> with Recorder(model) as rec:
    ...     model(x)
    >>> [r.key for r in rec.forward][:2]
    [('input', '', 0), ('input', 'fc1', 0)]
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from .._engine.forward import installed_forward
from .tolerance import excess

__all__ = [
    "Key",
    "Piece",
    "Record",
    "Recorder",
    "assemble",
    "compare",
    "first_tensor",
    "piece",
]

Key = tuple[str, str, int]  # (kind, module or parameter FQN, call number within the pass)


@dataclass(frozen=True)
class Piece:
    """This rank's part of a tensor and its layout across the TP ranks (``None``: unknown)."""

    tensor: torch.Tensor | None
    placement: Placement | None


@dataclass(frozen=True)
class Record:
    """One recorded tensor: ``key``, this rank's piece, and the module running at the time."""

    key: Key
    piece: Piece
    caller: str | None = None  # the module whose forward made the call (None: top level)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's input or output (tuples, lists and dicts searched in order).

    Example::

        >>> first_tensor((None, torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(obj, torch.Tensor):
        return obj
    items = (
        obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    )
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def piece(t: torch.Tensor | None, declared: Placement | None = None) -> Piece:
    """A detached copy of this rank's part of ``t``; a DTensor's own placement wins over ``declared``.

    Example::

        >>> piece(dtensor).placement
        Shard(dim=0)
    """
    if t is None:
        return Piece(None, None)
    if isinstance(t, DTensor):
        placements = tuple(t.placements)
        return Piece(t.to_local().detach().clone(), placements[0] if len(placements) == 1 else None)
    return Piece(t.detach().clone(), declared)


def _declared(module: nn.Module) -> tuple[Placement | None, Placement | None]:
    """The (input, output) layouts a parallelized module's forward declares for plain tensors.

    (A DTensor output carries its own placement, which :func:`piece` prefers.)
    """
    forward = installed_forward(module)
    if forward is None:
        return None, None
    return forward.input_layout, forward.output_layout


class Recorder:
    """Hooks on every submodule of ``model`` recording inputs, outputs and output gradients.

    ``forward`` holds inputs and outputs in execution order; ``backward`` the gradients
    arriving at module outputs in the order autograd computes them, plus (with
    ``param_order``) a marker ``("gradient", name, 0)`` when each parameter's gradient
    is accumulated. Module hooks are removed on exit; the tensor hooks stay on the
    outputs of this forward, so run backward after leaving the ``with`` block.

    Example::

        >>> with Recorder(model) as rec:
        ...     out = model(x)
        >>> out.sum().backward()
        >>> rec.backward[0].key
        ('output gradient', '', 0)
    """

    def __init__(self, model: nn.Module, *, param_order: bool = False) -> None:
        self.forward: list[Record] = []
        self.backward: list[Record] = []
        self._calls: Counter[str] = Counter()
        self._stack: list[str] = []
        self._handles: list[Any] = []
        for fqn, module in model.named_modules():
            declared = _declared(module)
            pre = functools.partial(self._pre, fqn, declared[0])
            post = functools.partial(self._post, fqn, declared[1])
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post))
        if param_order:
            for name, p in model.named_parameters():
                mark = functools.partial(self._mark, ("gradient", name, 0))
                self._handles.append(p.register_post_accumulate_grad_hook(mark))

    def _caller(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _pre(
        self, fqn: str, layout: Placement | None, module: nn.Module, args: Any, kwargs: Any
    ) -> None:
        n = self._calls[fqn]
        t = first_tensor((args, kwargs))
        if t is not None:
            self.forward.append(Record(("input", fqn, n), piece(t, layout), self._caller()))
        self._stack.append(fqn)

    def _post(
        self, fqn: str, layout: Placement | None, module: nn.Module, args: Any, out: Any
    ) -> None:
        self._stack.pop()
        n = self._calls[fqn]
        self._calls[fqn] += 1
        t = first_tensor(out)
        if t is None:
            return
        self.forward.append(Record(("output", fqn, n), piece(t, layout), self._caller()))
        if t.requires_grad:
            t.register_hook(functools.partial(self._grad, ("output gradient", fqn, n), layout))

    def _grad(self, key: Key, layout: Placement | None, grad: torch.Tensor) -> None:
        self.backward.append(Record(key, piece(grad, layout)))

    def _mark(self, key: Key, _param: torch.Tensor) -> None:
        self.backward.append(Record(key, Piece(None, None)))

    def remove(self) -> None:
        """Remove the module and parameter hooks (tensor hooks on outputs stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _infer(shapes: list[torch.Size], ref: torch.Size) -> Placement | None:
    """``Replicate`` if every piece has the reference shape, ``Shard(d)`` if they tile ``d``."""
    if all(s == ref for s in shapes):
        return Replicate()
    if any(len(s) != len(ref) for s in shapes):
        return None
    dims = {d for s in shapes for d in range(len(ref)) if s[d] != ref[d]}
    if len(dims) == 1:
        (d,) = dims
        if sum(s[d] for s in shapes) == ref[d]:
            return Shard(d)
    return None


def assemble(
    pieces: list[Piece], ref_shape: torch.Size
) -> tuple[list[tuple[str, torch.Tensor]], Placement | None]:
    """The global tensor(s) the ranks' pieces stand for, to compare with the reference.

    ``Shard(d)``: one tensor, the pieces concatenated along ``d``. ``Partial``: their
    sum. ``Replicate`` (or the reference's shape on every rank): every rank's own copy,
    labelled ``"rank r"``, since each must equal the reference. An empty list means the
    pieces' shapes fit no layout of the reference's shape.

    Example::

        >>> assemble([Piece(a, Shard(1)), Piece(b, Shard(1))], torch.Size([4, 8]))
        ([('gathered', <[4, 8]>)], Shard(dim=1))
    """
    tensors = [p.tensor for p in pieces if p.tensor is not None]
    if len(tensors) != len(pieces):
        return [], None
    declared = {type(p.placement) for p in pieces}
    placement = pieces[0].placement if len(declared) == 1 else None
    shapes = [t.shape for t in tensors]
    if placement is None or (
        isinstance(placement, Replicate) and any(s != ref_shape for s in shapes)
    ):
        placement = _infer(shapes, ref_shape)
    if isinstance(placement, Shard):
        d = placement.dim % max(len(ref_shape), 1)
        if any(len(s) != len(ref_shape) for s in shapes):
            return [], None
        return [("gathered", torch.cat(tensors, d))], Shard(d)
    if isinstance(placement, Partial):
        total = tensors[0].clone()
        for t in tensors[1:]:
            total += t
        return [("summed", total)], placement
    if placement is None:
        return [], None
    return [(f"rank {r}", t) for r, t in enumerate(tensors)], Replicate()


def compare(
    ref: torch.Tensor,
    candidates: list[tuple[str, torch.Tensor]],
    atol: float,
    rtol: float,
    scale: float = 0.0,
) -> tuple[float, float, str]:
    """``(|diff|, bound, which candidate)`` at the worst element of the worst candidate.

    Each element may differ by ``atol + rtol * (|ref| + scale)``
    (:func:`~shardwise.diagnostics.tolerance.excess`, NaN matching NaN); a shape mismatch
    counts as an infinite difference. With no element over its bound, the largest
    difference is reported.

    Example::

        >>> compare(torch.ones(2), [("rank 0", torch.ones(2))], 0.0, 1e-6, 1.0)
        (0.0, 2e-06, 'rank 0')
    """
    worst, worst_ratio = (0.0, atol, candidates[0][0] if candidates else ""), -1.0
    for label, t in candidates:
        if t.shape != ref.shape:
            return math.inf, atol, label
        found = excess(t, ref, tol=rtol, scale=scale, atol=atol, equal_nan=True)
        if found.bound > 0:
            ratio = found.diff / found.bound
        else:
            ratio = math.inf if found.diff > 0 else 0.0
        if ratio > worst_ratio:
            worst, worst_ratio = (found.diff, found.bound, label), ratio
    return worst
