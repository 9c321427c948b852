"""An all-gather that carries each rank's shape, so uneven or mismatched pieces never abort gloo.

A plain all-gather trusts every rank to send the same number of bytes. Under sequence
parallelism that is the user's sequence split: a 3 + 2 split, or a batch that differs
between ranks, makes gloo's transport receive more bytes than it expected, and it
terminates the process (SIGABRT) from a background thread, where no Python code can
catch it.

:func:`gather_sized` sends, in the same single all-gather, a small header (each rank's
shape and dtype) in front of its payload, padded to a byte capacity that every rank
of the group agrees on: the largest payload of the group's sized gathers so far. So in
steady state (shapes it has seen before) it is one collective, as before, plus copying
the local piece in and the gathered pieces out. When a payload outgrows the capacity,
the headers say so on every rank at once, and every rank repeats the gather with the
new capacity (two collectives, that time only: the first step, or a longer sequence).

Then every rank checks the same headers: pieces that agree in every dimension but the
gathered one, with lengths in ``torch.chunk`` layout (``3 + 2`` for 5 on 2 ranks, the
layout DTensor's ``Shard`` uses and the backward's reduce-scatter returns), are
concatenated; anything else raises the same ``ValueError`` on every rank, naming each
rank's shape, and the process group stays usable.

Only CPU tensors take this path (gloo, where the abort happens): reading the headers on
the host would synchronise an accelerator's stream on every gather, so there pieces
must keep the shapes the model declares (see the README's contract).

A dry run (:func:`shardwise.explain` with ``backend="gloo"``) computes on fake tensors,
whose values cannot be read; for the groups it registers with :func:`emulated_on`, the
same collectives are issued with the same sizes, each rank assumed to hold this rank's
piece (the even split a plan declares), so the dry run reports what a gloo run sends:
headers, padding and the first-step capacity agreement included.

Example::

    >>> full = gather_sized(x_mine, group, dim=0)   # 2 ranks with 3 and 2 rows -> 5 rows
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .torch_compat import all_gather_single, is_fake

__all__ = ["emulated_on", "gather_sized", "takes_sized_gather"]


_MAGIC = 0x5348_5744  # "SHWD": a header that is not one is a collective mismatch
_SHAPE_WORDS = 9
# magic, ndim, dim, dtype, payload bytes, rows along dim, numel of one row, shape words
_WORDS = 7 + _SHAPE_WORDS
_HEADER = 8 * _WORDS  # bytes; a multiple of 16 keeps every payload aligned for any dtype
_ALIGN = 16

# Payload capacity in bytes per process group. Every rank of a group updates it from the
# same gathered headers, so it stays equal across the group without communicating.
_CAPACITY: dict[tuple[Any, ...], int] = {}


# Groups whose sized gathers a dry run emulates on fake tensors (see emulated_on).
_EMULATED: set[tuple[Any, ...]] = set()

_KEYS: dict[int, tuple[ProcessGroup, tuple[Any, ...]]] = {}
_HEADERS: dict[tuple[Any, ...], torch.Tensor] = {}


def _group_key(group: ProcessGroup) -> tuple[Any, ...]:
    """A key naming ``group`` the same way on every rank (cached per group object)."""
    found = _KEYS.get(id(group))
    if found is not None and found[0] is group:
        return found[1]
    name = getattr(group, "group_name", None)
    key = (name, tuple(dist.get_process_group_ranks(group))) if name else (id(group),)
    _KEYS[id(group)] = (group, key)
    return key


def _header_bytes(xt: torch.Tensor, ndim: int, dim: int, shape: tuple[int, ...], need: int) -> torch.Tensor:
    """The header as bytes, cached per shape (a training loop repeats a few shapes)."""
    key = (shape, dim, xt.dtype)
    found = _HEADERS.get(key)
    if found is None:
        if len(_HEADERS) > 256:
            _HEADERS.clear()
        words = _header(xt, ndim, dim, shape, need)
        found = _HEADERS[key] = torch.tensor(words, dtype=torch.int64).view(torch.uint8)
    return found


def _header(xt: torch.Tensor, ndim: int, dim: int, shape: tuple[int, ...], need: int) -> list[int]:
    row = 1
    for n in xt.shape[1:]:
        row *= n
    words = list(shape[:_SHAPE_WORDS]) + [-1] * (_SHAPE_WORDS - min(ndim, _SHAPE_WORDS))
    dtype = zlib.crc32(str(xt.dtype).encode())
    return [_MAGIC, ndim, dim, dtype, need, int(xt.shape[0]), row, *words]


def _shape_text(head: list[int]) -> str:
    ndim = head[1]
    dims = [str(n) for n in head[7 : 7 + min(ndim, _SHAPE_WORDS)]]
    if ndim > _SHAPE_WORDS:
        dims.append("...")
    return f"({', '.join(dims)})"


def _check(heads: list[list[int]], dim: int, dtype: torch.dtype, world: int) -> list[int]:
    """Each rank's length along ``dim``; raises (identically everywhere) on a mismatch."""
    if any(h[0] != _MAGIC for h in heads):
        raise RuntimeError(
            "sequence-parallel gather: a rank sent something else in this collective; the ranks "
            "are running different collectives (their models or inputs take different paths)."
        )
    shapes = ", ".join(f"rank {r}: {_shape_text(h)}" for r, h in enumerate(heads))
    if any((h[1], h[2], h[3]) != (heads[0][1], heads[0][2], heads[0][3]) for h in heads):
        raise ValueError(
            f"sequence-parallel gather along dim {dim}: the ranks' pieces differ in rank or dtype "
            f"({shapes}; dtype here {dtype}). Every rank must pass its piece of the same tensor."
        )
    rows = [h[5] for h in heads]
    others = {(h[6], tuple(w for i, w in enumerate(h[7:]) if i != dim)) for h in heads}
    if len(others) > 1:
        raise ValueError(
            f"sequence-parallel gather along dim {dim}: the ranks' pieces differ in a dimension "
            f"other than {dim} ({shapes}). Only dim {dim} may differ between the ranks of a "
            "tensor-parallel group (e.g. every rank needs the same batch size)."
        )
    total = sum(rows)
    chunk = -(-total // world)  # torch.chunk: pieces of ceil(total / W), the tail shorter
    want = [max(0, min(chunk, total - r * chunk)) for r in range(world)]
    if rows != want:
        raise ValueError(
            f"sequence-parallel gather along dim {dim}: the ranks' lengths are {rows}, which is "
            f"not the torch.chunk split of {total} over {world} ranks ({want}); the result could "
            f"not be scattered back to the same split. Split the sequence with torch.chunk or "
            f"tensor_split ({shapes})."
        )
    return rows


@contextlib.contextmanager
def emulated_on(group: ProcessGroup) -> Iterator[None]:
    """Within the block, fake CPU tensors on ``group`` take the sized gather, emulated.

    Example::

        >>> with emulated_on(fake_group):   # explain(..., backend="gloo")
        ...     model(fake_input)
    """
    key = _group_key(group)
    _EMULATED.add(key)
    try:
        yield
    finally:
        _EMULATED.discard(key)
        _CAPACITY.pop(key, None)


def takes_sized_gather(x: torch.Tensor, group: ProcessGroup) -> bool:
    """Whether a gather of ``x`` with no known global length goes through :func:`gather_sized`.

    CPU tensors do (gloo); a dry run's fake CPU tensors only where it emulates gloo.
    """
    if x.device.type != "cpu":
        return False
    return not is_fake(x) or _group_key(group) in _EMULATED


def gather_sized(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, whatever its length there.

    The lengths must form a ``torch.chunk`` split (``ValueError`` on every rank
    otherwise, as for pieces that differ in another dimension or in dtype).

    Example::

        >>> gather_sized(torch.ones(3, 4), group, 0).shape    # the other rank holds (2, 4)
        torch.Size([5, 4])
    """
    world = dist.get_world_size(group)
    if world == 1:
        return x
    ndim = x.dim()
    dim = dim % max(ndim, 1)
    xt = x.detach().movedim(dim, 0).contiguous() if ndim else x.detach().reshape(1)
    payload = xt.reshape(-1).view(torch.uint8)
    need = payload.numel()
    key = _group_key(group)
    if is_fake(x):
        return _emulated(xt, group, key, need, world).movedim(0, dim) if ndim else x
    header = _header_bytes(xt, ndim, dim, tuple(x.shape), need).to(x.device)
    cap = _CAPACITY.get(key, 0)
    while True:
        slot = _HEADER + cap
        send = torch.empty(slot, dtype=torch.uint8, device=x.device)  # padding is not read
        send[:_HEADER] = header
        fits = min(need, cap)
        if fits:
            send[_HEADER : _HEADER + fits] = payload[:fits]
        flat = torch.empty(world * slot, dtype=torch.uint8, device=x.device)
        all_gather_single(flat, send, group=group)
        table = flat.view(world, slot)
        heads = table[:, :_HEADER].contiguous().view(torch.int64).tolist()
        if any(h[0] != _MAGIC for h in heads):
            _check(heads, dim, x.dtype, world)  # raises
        top = max(h[4] for h in heads)
        if top <= cap:
            break
        # Someone's piece did not fit: again, with room for all. Every rank read the same
        # headers, so every rank sets the same capacity. It never shrinks, so a group
        # that gathers pieces of several sizes pads the smaller ones rather than paying a
        # second collective whenever a larger one follows.
        cap = _CAPACITY[key] = -(-top // _ALIGN) * _ALIGN
    rows = _check(heads, dim, x.dtype, world)
    rest = tuple(xt.shape[1:])
    if need == cap and all(h[4] == need for h in heads):
        # Equal pieces that fill their slots (the steady state): one copy out.
        full = table[:, _HEADER:].view(x.dtype).reshape(world * rows[0], *rest)
    else:
        full = torch.cat([
            table[r, _HEADER : _HEADER + heads[r][4]].view(x.dtype).view(rows[r], *rest)
            for r in range(world)
        ])
    return full.movedim(0, dim) if ndim else full


def _emulated(
    xt: torch.Tensor, group: ProcessGroup, key: tuple[Any, ...], need: int, world: int
) -> torch.Tensor:
    """:func:`gather_sized`'s collectives on fake tensors, every rank holding ``need`` bytes."""
    cap = _CAPACITY.get(key, 0)
    while True:
        slot = _HEADER + cap
        send = torch.empty(slot, dtype=torch.uint8, device=xt.device)
        flat = torch.empty(world * slot, dtype=torch.uint8, device=xt.device)
        all_gather_single(flat, send, group=group)
        if need <= cap:
            break
        cap = _CAPACITY[key] = -(-need // _ALIGN) * _ALIGN
    return xt.new_empty((world * xt.shape[0], *xt.shape[1:]))
