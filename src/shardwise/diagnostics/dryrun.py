"""The machinery of a dry run: fake process groups, a collective log, saved-activation bytes.

:func:`shardwise.explain` runs a parallelized copy of a model on fake tensors (shapes and
dtypes, no storage) in one process. This module gives it the three things it needs:

* :func:`fake_mesh`: a 1-D or 2-D ``DeviceMesh`` of any size over torch's fake process
  group (collectives return at once and move nothing), as rank 0. Without a process group
  it is the default group for the duration; inside a job it is an extra group next to the
  job's, removed on exit, so the job's own groups never see a collective.
* :class:`CollectiveLog`: counts collectives on one group and their bytes as NCCL-tests
  sizes them (all-reduce: the reduced tensor; all-gather: the gathered output;
  reduce-scatter: the input), from the c10d and functional ops themselves, so whatever
  issues them (shardwise's collectives, the gradient hand-off, DTensor) is counted.
* :func:`saved_activation_bytes`: bytes of the distinct storages autograd saves for
  backward, leaving out the ones given (parameters).

Fake CPU tensors take the kernels CPU tensors take (fused attention included), so what
autograd saves is what a real CPU step saves.

Example::

    >>> with fake_mesh(8) as mesh, CollectiveLog(mesh.get_group()) as log:
    ...     y = parallelize_module(meta_model, mesh, plan)(x_meta)
    >>> log.summary()
    {'all_reduce': {'count': 2, 'bytes': 65536}, 'all_gather': {...}, 'reduce_scatter': {...}}
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .._engine.sized_gather import emulated_on
from .._engine.torch_compat import (
    TorchDispatchMode,
    fake_group_in_job,
    fake_world,
)

__all__ = [
    "KINDS",
    "CollectiveLog",
    "fake_mesh",
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
def fake_mesh(tp_size: int, dp_size: int = 1, *, backend: str = "nccl") -> Iterator[DeviceMesh]:
    """A CPU mesh over fake process groups, this process as rank 0 of each dimension.

    1-D (``tp_size`` ranks) when ``dp_size`` is 1, else 2-D ``(dp_size, tp_size)`` named
    ``("dp", "tp")``. Nothing is communicated, whatever runs on it. With no default process
    group, a fake one of ``dp_size * tp_size`` ranks is created for the duration and
    destroyed on exit. Inside a job, separate fake groups are registered next to the job's
    (their other members are rank numbers no process has) and destroyed on exit; the job's
    groups are untouched. ``backend="gloo"`` makes fake CPU tensors on the TP group take
    the sized gather gloo runs take (headers, padding, first-step agreement).

    Example::

        >>> with fake_mesh(8, 4) as mesh:
        ...     model = parallelize_module(meta_model, mesh, plan, tp_mesh_dim=1)
    """
    for name, size in (("tp_size", tp_size), ("dp_size", dp_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    with contextlib.ExitStack() as stack:
        mesh = _own_world(stack, tp_size, dp_size) if not dist.is_initialized() else _beside_job(
            stack, tp_size, dp_size
        )
        if backend == "gloo":
            stack.enter_context(emulated_on(mesh.get_group(mesh.ndim - 1)))
        yield mesh


def _own_world(stack: contextlib.ExitStack, tp: int, dp: int) -> DeviceMesh:
    fake_world(tp * dp)
    stack.callback(dist.destroy_process_group)
    if dp == 1:
        world = dist.group.WORLD
        assert world is not None
        return DeviceMesh.from_group(world, "cpu")
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _beside_job(stack: contextlib.ExitStack, tp: int, dp: int) -> DeviceMesh:
    rank, free = dist.get_rank(), dist.get_world_size()  # rank numbers from ``free`` are unused
    grid = torch.arange(free, free + tp * dp).view(dp, tp)
    grid[0, 0] = rank
    groups = []
    for size, others in ((dp, grid[1:, 0].tolist()), (tp, grid[0, 1:].tolist())):
        if size == 1 and dp == 1:
            continue
        pg = fake_group_in_job(size, f"shardwise_dry_run_{next(_NAMES)}", others)
        stack.callback(dist.destroy_process_group, pg)
        groups.append(pg)
    if dp == 1:
        return DeviceMesh.from_group(groups[0], "cpu")
    return DeviceMesh.from_group(groups, "cpu", mesh=grid, mesh_dim_names=("dp", "tp"))


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
