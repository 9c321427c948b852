"""Counting the activation bytes autograd saves for backward (what sequence parallelism divides).

:func:`saved_activation_bytes` runs one forward under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages packed
for backward, leaving out the model's parameters (their local shards included): what
is left is the activation memory a training step holds between forward and backward.
Storages are deduplicated by address, so a tensor saved by q, k and v counts once, as
do views of one buffer.

Example::

    >>> saved_activation_bytes(model, x)   # bytes on this rank
    1114112
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["parameter_storages", "saved_activation_bytes"]


def parameter_storages(model: nn.Module) -> set[int]:
    """Addresses of the storages of ``model``'s parameters (local shards for DTensors).

    Example::

        >>> len(parameter_storages(nn.Linear(2, 2)))
        2
    """
    out = set()
    with torch.no_grad():  # to_local() records nothing
        for p in model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            out.add(local.untyped_storage().data_ptr())
    return out


def saved_activation_bytes(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in ``model(*args)``.

    The output is released before returning (so is the graph), so the count is exactly
    what one forward keeps alive for its backward, without running it.

    Example::

        >>> saved_activation_bytes(GPTStack(64, 4), torch.randn(256, 1, 64))
    """
    params = parameter_storages(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # to_local() records nothing (no op inside a pack hook)
            local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
    del out
    return sum(seen.values())
