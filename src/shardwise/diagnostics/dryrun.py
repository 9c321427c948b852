"""The machinery of a dry run: a fake TP group, a collective log, saved-activation bytes.

:func:`shardwise.explain` runs a parallelized copy of a model on the meta device in one
process. This module gives it the three things it needs:

* :func:`fake_tp_mesh`: a 1-D ``DeviceMesh`` of any size over torch's fake process group
  (collectives return at once and move nothing), as rank 0. Without a process group it
  is the default group for the duration; inside a job it is an extra group next to the
  job's, removed on exit, so the job's own groups never see a collective.
* :class:`CollectiveLog`: counts collectives on one group and their bytes as NCCL-tests
  sizes them (all-reduce: the reduced tensor; all-gather: the gathered output;
  reduce-scatter: the input), from the c10d and functional ops themselves, so whatever
  issues them (shardwise's collectives, the gradient hand-off, DTensor) is counted.
* :func:`saved_activation_bytes`: bytes of the distinct storages autograd saves for
  backward, leaving out the ones given (parameters).

:func:`flash_attention_on_meta` makes ``scaled_dot_product_attention`` on meta tensors
save what the CPU kernel saves (meta alone would take the math path and save the
attention matrix).

Example::

    >>> with fake_tp_mesh(8) as mesh, CollectiveLog(mesh.get_group()) as log:
    ...     y = parallelize_module(meta_model, mesh, plan)(x_meta)
    >>> log.summary()
    {'all_reduce': {'count': 2, 'bytes': 65536}, 'all_gather': {...}, 'reduce_scatter': {...}}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from .._engine.torch_compat import (
    TorchDispatchMode,
    fake_group_in_job,
    fake_world,
    fused_sdp_choice,
    sdpa_flash_cpu,
)

__all__ = [
    "KINDS",
    "CollectiveLog",
    "fake_tp_mesh",
    "flash_attention_on_meta",
    "saved_activation_bytes",
]

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
_NAMES = itertools.count()


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


@contextmanager
def fake_tp_mesh(size: int) -> Iterator[DeviceMesh]:
    """A 1-D CPU mesh of ``size`` ranks over a fake process group, this process as rank 0.

    Nothing is communicated, whatever runs on it. With no default process group, one is
    created for the duration (fake, of ``size``) and destroyed on exit. Inside a job,
    a separate fake group is registered next to the job's (its other members are
    placeholder rank numbers) and destroyed on exit; the job's groups are untouched.

    Example::

        >>> with fake_tp_mesh(64) as mesh:
        ...     model = parallelize_module(meta_model, mesh, plan)
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tp_size must be a positive int, got {size!r}")
    if not dist.is_initialized():
        fake_world(size)
        try:
            world = dist.group.WORLD
            assert world is not None
            yield DeviceMesh.from_group(world, "cpu")
        finally:
            dist.destroy_process_group()
        return
    pg = fake_group_in_job(size, f"shardwise_dry_run_{next(_NAMES)}")
    try:
        yield DeviceMesh.from_group(pg, "cpu")
    finally:
        dist.destroy_process_group(pg)


# op name -> (kind, which argument is sized, multiply by the group size)
_OPS: dict[str, tuple[str, int, bool]] = {
    "c10d.allreduce_": ("all_reduce", 0, False),
    "c10d.allreduce_coalesced_": ("all_reduce", 0, False),
    "c10d._allgather_base_": ("all_gather", 0, False),
    "c10d.allgather_": ("all_gather", 0, False),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0, False),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1, False),
    "c10d.reduce_scatter_": ("reduce_scatter", 1, False),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, False),
    "_c10d_functional.all_reduce": ("all_reduce", 0, False),
    "_c10d_functional.all_reduce_": ("all_reduce", 0, False),
    "_c10d_functional.all_reduce_coalesced": ("all_reduce", 0, False),
    "_c10d_functional.all_reduce_coalesced_": ("all_reduce", 0, False),
    "_c10d_functional.all_gather_into_tensor": ("all_gather", 0, True),
    "_c10d_functional.all_gather_into_tensor_out": ("all_gather", 0, True),
    "_c10d_functional.all_gather_into_tensor_coalesced": ("all_gather", 0, True),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 0, False),
    "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce_scatter", 0, False),
}


def _group_name(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The name of the group a c10d or functional collective runs on (``None``: not one)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name not in ("process_group", "group_name"):
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, str):
            return value
        if isinstance(value, torch.ScriptObject):
            value = dist.ProcessGroup.unbox(value)
        return str(getattr(value, "group_name", value))
    return None


class CollectiveLog(TorchDispatchMode):
    """Counts the collectives run on ``group`` (all groups if ``None``) while active.

    ``events`` lists ``(kind, bytes)`` in order; collectives of other kinds (broadcast,
    all-to-all, ...) are listed with their op name as the kind.

    Example::

        >>> with CollectiveLog(mesh.get_group()) as log:
        ...     model(x).sum().backward()
        >>> log.summary()["all_reduce"]
        {'count': 4, 'bytes': 16384}
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group_name = None if group is None else str(group.group_name)
        self.events: list[tuple[str, int]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            name = _group_name(func, args, kwargs)
            if name is not None and self.group_name in (None, name):
                self.events.append(self._event(func, args))
        return func(*args, **kwargs)

    @staticmethod
    def _event(func: Any, args: tuple[Any, ...]) -> tuple[str, int]:
        op = str(func.overloadpacket)
        known = _OPS.get(op)
        if known is None:
            return op, _nbytes(args[0]) if args else 0
        kind, index, times_group = known
        size = _nbytes(args[index])
        if times_group:
            size *= int(args[index + 1])  # functional gathers: (input, group_size, ...)
        return kind, size

    def summary(self) -> dict[str, dict[str, int]]:
        """``{kind: {"count", "bytes"}}`` for the three TP collectives (zeros included)."""
        out = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
        for kind, size in self.events:
            if kind in out:
                out[kind]["count"] += 1
                out[kind]["bytes"] += size
        return out

    def others(self) -> list[str]:
        """Kinds of collectives seen that are not one of :data:`KINDS`."""
        return sorted({kind for kind, _ in self.events if kind not in KINDS})


def _storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


@contextmanager
def saved_activation_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Bytes of distinct storages autograd saves for backward inside the block.

    Storages of ``exclude`` (parameters, buffers) are not counted. The result dict's
    ``"bytes"`` is filled in on exit. Saved tensors are kept alive by the graph, so a
    storage counted once cannot be freed and replaced by another during the block.

    Example::

        >>> with saved_activation_bytes(model.parameters()) as saved:
        ...     y = model(x)
        >>> saved["bytes"]
    """
    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key not in seen:
            seen[key] = t
        return t

    result = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(t.untyped_storage().nbytes() for t in seen.values())


class flash_attention_on_meta(TorchFunctionMode):
    """``scaled_dot_product_attention`` on meta tensors takes the kernel CPU would take.

    The meta device has no fused attention, so torch falls back to the math path there,
    which saves the whole attention matrix for backward. This mode asks torch which
    kernel CPU tensors of the same shapes would get and, for the fused one, calls it:
    it saves q, k, v, the output and the log-sum-exp (and the mask, as a float tensor),
    as a real CPU run does.

    Example::

        >>> with flash_attention_on_meta():
        ...     y = model(x_meta)
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            out = _meta_flash(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with ``t``'s shape, dtype and grad flag, one row of memory."""
    row = torch.empty(t.shape[-1] if t.dim() else 1, dtype=t.dtype, requires_grad=t.requires_grad)
    return row.expand(t.shape) if t.dim() else row[0]


def _meta_flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    if not all(isinstance(t, torch.Tensor) and t.is_meta for t in (query, key, value)):
        return None
    from torch.nn.attention import SDPBackend

    mask = None if attn_mask is None else _stand_in(attn_mask)
    choice = fused_sdp_choice(
        _stand_in(query), _stand_in(key), _stand_in(value), mask, dropout_p, is_causal,
        scale=scale, enable_gqa=enable_gqa,
    )
    if choice != SDPBackend.FLASH_ATTENTION.value:
        return None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # As sdpa does before a fused kernel: 0 where attending, -inf elsewhere.
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attn_mask = zero.masked_fill(~attn_mask, float("-inf"))
    out = sdpa_flash_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]
