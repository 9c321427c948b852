"""Before any weight moves, the ranks of a TP group agree on what ``parallelize_module`` will do.

Planning is local: it depends only on the model and the plan each rank was given. If
those differ between ranks (rank 0 gives ``q`` Colwise and rank 1 Rowwise, a model built
in another dtype, a plan dict built from a ``set`` whose order differs under torchrun's
per-process hash seed), the weight scatters that follow would pair up the wrong
collectives: a hang, or shards silently swapped. So:

* the steps are applied in a **canonical order** (the model's own module order, not
  the plan's key order), so the same plan in another key order scatters the same
  tensors in the same order;
* the ranks compare a **fingerprint** of the steps (FQN, style, module type and each
  parameter's shape, dtype and device type) in one all-gather of six integers, once per
  ``parallelize_module`` call. If they differ, a second exchange (only then) gathers the
  step lists, and every rank raises the same ``ValueError`` naming the first differing
  step and which ranks hold which version. Both exchanges complete on every rank, so the
  process group stays usable.

It also refuses models that a data-parallel wrapper already owns (:func:`check_not_wrapped`):
tensor parallelism goes first, then DDP or FSDP over the other mesh dimension.

Example::

    >>> steps = agree_on_plan(model, steps, tp_mesh)   # raises on every rank on a mismatch
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["agree_on_plan", "canonical_order", "check_not_wrapped", "describe_fn", "describe_style"]

_ORDER = "TP first, then data parallelism over the other mesh dimension"
_FSDP2 = "fully_shard(model, mesh=mesh2d['dp'])"
_DDP_MESSAGE = (
    "DistributedDataParallel cannot synchronize a model parallelized by shardwise: its "
    "gradients reach the DTensor parameters when backward ends, outside the autograd hooks "
    "DDP syncs in, so every replica would train on its own gradients. For data parallelism "
    f"over the other mesh dimension use FSDP2 after tensor parallelism: {_FSDP2} "
    "(shardwise.fsdp.parallelize_2d does both; reshard_after_forward=False keeps parameters "
    "gathered like DDP). If DDP was given device_mesh=, it may already have converted the "
    "parameters: build and parallelize the model again."
)


class _StepLike(Protocol):
    @property
    def fqn(self) -> str: ...
    @property
    def module(self) -> nn.Module: ...
    @property
    def what(self) -> str: ...


S = TypeVar("S", bound=_StepLike)


# -- data-parallel wrappers ------------------------------------------------------------------
def _wrappers() -> list[tuple[type, str, str]]:
    """(class, name, how to wrap after TP) for every wrapper torch has in this build."""
    found: list[tuple[type, str, str]] = []
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if isinstance(ddp, type):
        # DDP cannot follow either (see RefuseDDP): data parallelism goes through FSDP2.
        found.append((ddp, "DistributedDataParallel (DDP)", f"{_FSDP2} (DDP cannot sync it)"))
    try:
        from torch.distributed import fsdp
    except ImportError:  # pragma: no cover - torch without distributed FSDP
        return found
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if isinstance(fsdp1, type):
        found.append((fsdp1, "FullyShardedDataParallel (FSDP1)",
                      "FSDP(model, device_mesh=mesh2d['dp'], use_orig_params=True)"))
    fsdp2 = getattr(fsdp, "FSDPModule", None)
    if isinstance(fsdp2, type):
        found.append((fsdp2, "fully_shard (FSDP2)", _FSDP2))
    return found


def check_not_wrapped(module: nn.Module) -> None:
    """Raise if ``module`` or a submodule is already wrapped by DDP or FSDP (no communication).

    DDP registers its gradient hooks on the parameters it was given; parallelizing
    afterwards replaces them, which silently turns DDP's gradient sync off. FSDP has
    already flattened or sharded them. Either way the order must be: parallelize first
    (``tp_mesh_dim`` picks the TP dimension of a 2-D mesh), then wrap over the other one.

    Example::

        >>> check_not_wrapped(DDP(model))
        Traceback (most recent call last):
        TypeError: parallelize_module: the model is wrapped in DistributedDataParallel (DDP) ...
    """
    kinds = _wrappers()
    if not kinds:
        return
    classes = tuple(k for k, _, _ in kinds)
    for fqn, sub in module.named_modules():
        if isinstance(sub, classes):
            for cls, name, how in kinds:
                if isinstance(sub, cls):
                    where = f"'{fqn}'" if fqn else "the model"
                    raise TypeError(
                        f"parallelize_module: {where} is wrapped in {name}; "
                        f"apply tensor parallelism to the unwrapped model first, then wrap it "
                        f"({_ORDER}): parallelize_module(model, mesh2d, plan, tp_mesh_dim=1), "
                        f"then {how}."
                    )


class RefuseDDP:
    """Set as ``_ddp_params_and_buffers_to_ignore`` on a parallelized model: DDP raises.

    ``DistributedDataParallel.__init__`` reads that attribute (``set(...)``) before it
    broadcasts or registers anything; iterating this object raises a ``TypeError`` that says
    why DDP cannot work here and what to use instead, on every rank alike, instead of a DDP
    that runs and never synchronizes the gradients.

    Example::

        >>> DDP(parallelize_module(model, mesh2d, plan, tp_mesh_dim=1))
        Traceback (most recent call last):
        TypeError: DistributedDataParallel cannot synchronize a model parallelized by shardwise ...
    """

    def __iter__(self) -> Any:
        raise TypeError(_DDP_MESSAGE)

    def __repr__(self) -> str:
        return "RefuseDDP()"


# -- describing steps ------------------------------------------------------------------------
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_fn(fn: Any) -> str:
    """A rank-independent name for a prepare function (``None`` stays ``None``).

    Example::

        >>> describe_fn(make_input_replicate_1d)
        'make_input_replicate_1d'
    """
    if fn is None:
        return "None"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '')}.{name}".lstrip(".")


def describe_style(style: Any) -> str:
    """``repr(style)`` without memory addresses, which differ from rank to rank.

    Example::

        >>> describe_style(ColwiseParallel())
        'ColwiseParallel(_prepare_input=make_input_replicate_1d, _prepare_output=...)'
    """
    cls = type(style)
    if getattr(cls, "__repr__") is object.__repr__:  # noqa: B009 - keeps mypy off the identity
        text = f"{cls.__module__}.{cls.__qualname__}"
    else:
        text = _ADDRESS.sub("", repr(style))
    return text.replace("\n", " ")


def _describe_module(module: nn.Module) -> str:
    params = ", ".join(
        f"{name} {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')} {p.device.type}"
        for name, p in module.named_parameters()
    )
    return f"{type(module).__qualname__}[{params}]"


def _entry(step: _StepLike) -> str:
    text = f"'{step.fqn}': {step.what} on {_describe_module(step.module)}"
    return text.replace("\n", " ")


# -- canonical order ---------------------------------------------------------------------------
def canonical_order(root: nn.Module, steps: Sequence[S]) -> list[S]:
    """``steps`` in the model's module order (then FQN), whatever order the plan listed them.

    Steps on one module keep their plan order: those are hooks whose order is the
    user's to choose, and the fingerprint catches ranks that list them differently.

    Example::

        >>> [s.fqn for s in canonical_order(model, steps)]
        ['blocks.0.q', 'blocks.0.k', 'blocks.1.q', 'blocks.1.k']
    """
    position: dict[int, int] = {}
    for i, (_, m) in enumerate(root.named_modules(remove_duplicate=False)):
        position.setdefault(id(m), i)
    indexed = sorted(
        enumerate(steps),
        key=lambda item: (position.get(id(item[1].module), len(position)), item[1].fqn, item[0]),
    )
    return [step for _, step in indexed]


# -- the agreement -----------------------------------------------------------------------------
def _device(mesh: DeviceMesh) -> torch.device:
    kind = mesh.device_type
    if kind == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, kind, None)
    current: Callable[[], int] | None = getattr(backend, "current_device", None)
    return torch.device(kind, current()) if current is not None else torch.device(kind)


def _all_gather(t: torch.Tensor, group: Any, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return out


def _digest(entries: list[str], world: int) -> tuple[bytes, list[int]]:
    blob = "\n".join([f"shardwise plan v1, tp size {world}", *entries]).encode()
    head = hashlib.sha256(blob).digest()
    words = [int.from_bytes(head[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]
    return blob, [len(entries), len(blob), *words]


def _mismatch_message(texts: list[str], ranks: list[int]) -> str:
    lists = [text.split("\n")[1:] for text in texts]
    headers = [text.split("\n")[0] for text in texts]
    longest = max(len(lst) for lst in lists)
    index, values = -1, headers
    if len(set(headers)) == 1:
        for i in range(longest):
            values = [lst[i] if i < len(lst) else "(no entry)" for lst in lists]
            if len(set(values)) > 1:
                index = i
                break
    holders: dict[str, list[int]] = {}
    for rank, value in zip(ranks, values):
        holders.setdefault(value, []).append(rank)
    versions = "; ".join(f"rank(s) {rs}: {value}" for value, rs in holders.items())
    where = "the plan header" if index < 0 else f"step {index} in module order"
    counts = ", ".join(f"rank {r}: {len(lst)}" for r, lst in zip(ranks, lists))
    return (
        f"parallelize_module: the {len(ranks)} ranks {ranks} of the tensor-parallel group were "
        f"given different models or plans (nothing was moved; every rank raises this). "
        f"First difference, at {where}: {versions}. Steps per rank: {counts}. Every rank must "
        "pass the same model (types, shapes, dtypes) and the same plan; the order of a plan's "
        "keys does not matter."
    )


def agree_on_plan(root: nn.Module, steps: Sequence[S], mesh: DeviceMesh) -> list[S]:
    """``steps`` in canonical order, once every rank of ``mesh`` holds the same ones.

    One all-gather of six integers per call; on a mismatch a second all-gather of the
    step lists, then ``ValueError`` on every rank naming the first differing step.

    Example::

        >>> for step in agree_on_plan(model, planner.steps, tp_mesh):
        ...     step.apply()
    """
    ordered = canonical_order(root, steps)
    world = mesh.size()
    if world == 1 or not dist.is_initialized():
        return ordered
    group = mesh.get_group()
    device = _device(mesh)
    blob, code = _digest([_entry(s) for s in ordered], world)
    codes = _all_gather(torch.tensor(code, dtype=torch.int64, device=device), group, world)
    if all(torch.equal(c, codes[0]) for c in codes[1:]):
        return ordered
    # Only on a mismatch: every rank knows it now, so every rank takes part in this.
    longest = max(int(c[1]) for c in codes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    blobs = _all_gather(buf, group, world)
    texts = [
        bytes(b[: int(c[1])].cpu().numpy()).decode(errors="replace") for b, c in zip(blobs, codes)
    ]
    ranks = dist.get_process_group_ranks(group)
    raise ValueError(_mismatch_message(texts, ranks))
