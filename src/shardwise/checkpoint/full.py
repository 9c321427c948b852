"""Full (single-device) state dicts: one ordinary file for inference and other tools.

:func:`export_full_state_dict` gathers every DTensor to its full value,
:func:`save_full_state_dict` writes that to one file (``torch.save``, or safetensors when
the name ends in ``.safetensors``) atomically and with checksums, and
:func:`load_full_state_dict` slices each tensor locally by the parameter's own placements:
every rank reads the file, and no collective moves data.

Example::

    >>> save_full_state_dict(tp_model, "model.safetensors")
    >>> load_full_state_dict(other_tp_model, "model.safetensors")   # any TP size
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .._engine.consensus import agree, on_rank0
from .files import PathLike, fsync, remove, swap_in
from .integrity import (
    SAFETENSORS_KEY,
    check_safetensors,
    check_zip,
    load_weights_only,
    safetensors_checksums,
)

__all__ = [
    "export_full_state_dict",
    "load_full_state_dict",
    "mismatches",
    "save_full_state_dict",
]


def export_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A single-device ``state_dict`` of ``model``: every DTensor gathered to its full value.

    Collective: every rank must call it, and **every rank** gets the whole dict (on the
    parameters' device). Keys are ``model.state_dict()``'s, so the result loads into the
    unparallelized model with ``load_state_dict``. Plain tensors share storage with the
    model, as in ``state_dict()``; non-tensor entries (``_extra_state``) are left out.

    Example::

        >>> full = export_full_state_dict(tp_model)
        >>> plain_model.load_state_dict(full)
    """
    full: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            full[name] = value.detach()
    return full


def save_full_state_dict(model: nn.Module, path: PathLike) -> None:
    """Write :func:`export_full_state_dict` of ``model`` to one file, atomically.

    Rank 0 writes (``torch.save``, or safetensors when ``path`` ends in
    ``.safetensors``) into a temporary file next to ``path`` and renames it onto
    ``path``; every rank returns once the file is in place. Tensors are moved to CPU.
    Both formats carry checksums that :func:`load_full_state_dict` verifies: a
    ``torch.save`` archive's per-record CRC-32s, and a CRC-32 per tensor in the
    safetensors header (``shardwise.crc32``); stock tools read either file as usual.

    Example::

        >>> save_full_state_dict(tp_model, "model.safetensors")
    """
    target = Path(path)
    state = export_full_state_dict(model)

    def write() -> None:
        tensors = {name: t.cpu() for name, t in state.items()}
        staging = target.with_name(f".{target.name}.tmp")
        try:
            if target.name.endswith(".safetensors"):
                flat = _unshared(tensors)
                metadata = {"format": "pt", SAFETENSORS_KEY: safetensors_checksums(flat)}
                save_safetensors(flat, os.fspath(staging), metadata=metadata)
            else:
                torch.save(tensors, staging)
            fsync(staging)
            swap_in(staging, target)
        except BaseException:
            remove(staging)
            raise

    on_rank0(write)


def load_full_state_dict(
    model: nn.Module,
    path_or_state_dict: PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> None:
    """Load a single-device ``state_dict`` (a file or a dict) into ``model``, in place.

    Each DTensor parameter or buffer takes its own slice of the full tensor according to
    its mesh and placements (``distribute_tensor(..., src_data_rank=None)`` slices
    locally), and the slice is copied into the existing local tensor: no collective
    moves data, and the Parameter objects an optimizer holds stay the same. Plain tensors are
    copied whole; values are cast to the model's dtypes. Every rank reads the file
    itself, so it must be visible to all.

    Everything is checked before anything is copied, and the ranks agree with one small
    collective: a file that is missing on some rank, corrupt (its checksums, when it
    carries them: every file :func:`save_full_state_dict` writes does), or holds anything
    but tensors (``weights_only=True``; safetensors holds nothing else), and missing keys,
    unexpected keys (with ``strict``) or global shape mismatches, raise one error naming
    the file or keys on every rank and leave the model untouched.

    Args:
        model: the model to fill, parallelized at any size or not at all.
        path_or_state_dict: a ``torch.save`` file (read with ``weights_only=True``), a
            ``.safetensors`` file, or a dict of full tensors.

    Keyword Args:
        strict: reject keys in the state dict that the model lacks.

    Example::

        >>> model = parallelize_module(MLP(), mesh_of(4), PairwiseParallel())
        >>> load_full_state_dict(model, "model.safetensors")
    """
    targets = {
        name: t
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor)
    }
    state: Mapping[str, Any] = {}
    problem: Exception | None = None
    try:
        if isinstance(path_or_state_dict, Mapping):
            state = path_or_state_dict
        else:
            state = _read_full(Path(path_or_state_dict))
        found = {k: v.shape if isinstance(v, torch.Tensor) else None for k, v in state.items()}
        wanted = {k: t.shape for k, t in targets.items()}
        problems = mismatches(wanted, found, strict, "the state dict")
        if problems:
            raise RuntimeError("; ".join(problems) + ".")
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
        problem = exc
    agree("load_full_state_dict", problem)
    with torch.no_grad():
        for name, target in targets.items():
            if name in state:
                _copy_full_into(target, state[name])


def _read_full(path: Path) -> Mapping[str, torch.Tensor]:
    """Read a full state dict file, checking its checksums; no code runs from it."""
    if not path.is_file():
        raise FileNotFoundError(f"no file at '{path}'")
    if path.name.endswith(".safetensors"):
        tensors = load_safetensors(os.fspath(path), device="cpu")
        check_safetensors(path, tensors)
        return tensors
    check_zip(path)
    state = load_weights_only(path, "a full state dict")
    if not isinstance(state, Mapping):
        raise TypeError(f"'{path}' holds a {type(state).__name__}, not a dict.")
    return state


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` (the global value) into ``target``'s storage; DTensors take their slice."""
    if isinstance(target, DTensor):
        # src_data_rank=None: every rank slices the full tensor it holds; no scatter.
        try:
            mine = distribute_tensor(
                full.detach(), target.device_mesh, target.placements, src_data_rank=None
            )
        except TypeError:  # torch < 2.6: no src_data_rank; a scatter of equal values
            mine = distribute_tensor(full.detach(), target.device_mesh, target.placements)
        target.to_local().copy_(mine.to_local())
    else:
        target.copy_(full)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, cloning any that shares storage with an earlier one (tied
    weights): safetensors refuses aliases, which ``torch.save`` stores once."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t.contiguous()
    return out


def mismatches(
    wanted: Mapping[str, torch.Size],
    found: Mapping[str, torch.Size | None],
    strict: bool,
    source: str,
) -> list[str]:
    """Missing keys, unexpected keys (if ``strict``), non-tensors and shape mismatches."""
    problems = []
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        problems.append(f"missing keys {missing}")
    unexpected = sorted(found.keys() - wanted.keys())
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, shape in wanted.items():
        if key not in found:
            continue
        got = found[key]
        if got is None:
            problems.append(f"'{key}' in {source} is not a tensor")
        elif tuple(got) != tuple(shape):
            problems.append(
                f"shape mismatch for '{key}': {source} has {tuple(got)}, the model {tuple(shape)}"
            )
    return problems
