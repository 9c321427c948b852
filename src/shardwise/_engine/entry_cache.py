"""One entry collective per activation, however many parallel layers read it.

q, k and v projections (or a gate and an up projection) read the same activation; so do
a ``ColwiseParallel`` q projection and ``ColwiseHeads`` k/v projections. Giving them one
shared entry tensor means one all-gather in forward, and autograd sums their gradients
before the entry's backward runs, so one all-reduce or reduce-scatter in backward, as in
Megatron's fused QKV. Every column-parallel forward takes its entry from here.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import collectives as C

__all__ = ["shared_entry"]


# key -> (entry, a weak reference to the entry's source whose callback drops the key)
_SHARED: dict[tuple[Any, ...], tuple[torch.Tensor, weakref.ref[torch.Tensor]]] = {}


def shared_entry(
    kind: str, x: torch.Tensor, group: Any, dim: int, make: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """Run an input collective once per (tensor, group), however many layers consume it.

    q, k and v projections (or a gate and an up projection) read the same activation.
    Giving them one shared entry tensor means one all-gather in forward, and autograd
    sums their gradients before the entry's backward runs, so one all-reduce or
    reduce-scatter in backward, as in Megatron's fused QKV.

    An entry lives exactly as long as its source tensor: a weak-reference callback drops it
    when the source is freed (entries never reference their source, so this happens
    when the model's forward lets go of it).

    ``make`` builds the entry; ``None`` means ``copy_to_region(x, group)``, the column
    layers' default, so that path creates no closure per call (it runs for every q/k/v/up
    call, between large kernels, where each Python call and line is dear).
    """
    if kind == "f" and not (torch.is_grad_enabled() and x.requires_grad):
        return x  # no gradient will flow back: the identity needs no collective either
    # Module backward hooks (``register_full_backward_hook``, and tools built on them such
    # as CommDebugMode) hand each module an identity view of its input, so q, k and v may
    # receive different objects for one activation. Key by what the tensor *is*: its root
    # base (views share its version counter) and its place in that memory.
    source = x._base
    if source is None:
        source = x
    if source.is_inference():
        # Inference tensors keep no version counter, so an in-place change could not be
        # told from the tensor the entry was made for: no sharing, one collective per layer.
        return C.copy_to_region(x, group) if make is None else make()
    key = (
        kind, id(source), source._version, x.storage_offset(), x.shape, x.stride(), x.dtype,
        id(group), dim, torch.is_grad_enabled(),
    )
    found = _SHARED.get(key)
    if found is not None:
        return found[0]
    entry = C.copy_to_region(x, group) if make is None else make()
    # A plain weak reference with a callback (cheaper than weakref.finalize); it lives in
    # the cache value, so it outlives the source and the callback fires.
    _SHARED[key] = (entry, weakref.ref(source, functools.partial(_drop_entry, key)))
    return entry


def _drop_entry(key: tuple[Any, ...], _source: Any) -> None:
    _SHARED.pop(key, None)
