"""Checkpoints that reshard: save at one tensor-parallel size, load at another.

Two formats:

* **Sharded** (:func:`save_checkpoint`, :func:`load_checkpoint`): a directory written
  through ``torch.distributed.checkpoint`` (DCP). Each rank writes only its own shards;
  the metadata records every tensor's global shape and which slice each file holds, so
  a load at any tensor-parallel size reads exactly the slices its new shards need. Model
  and optimizer state (momentum, ``exp_avg``, ...) both reshard, and the same directory
  loads into a plain, unparallelized model, with or without a process group.
* **Full** (:func:`export_full_state_dict`, :func:`save_full_state_dict`,
  :func:`load_full_state_dict`): an ordinary single-device ``state_dict`` in one file
  (``torch.save``, or safetensors when the name ends in ``.safetensors``) for inference
  and other tools. Loading it slices each tensor locally by the parameter's own
  placements: every rank reads the file, and no collective moves data.

Writes are atomic. A checkpoint is written into a temporary sibling (``.<name>.tmp``)
and moved onto ``path`` by rank 0 only after every rank has finished writing, so a
crash or a failed write never leaves a half checkpoint at ``path``; an older
checkpoint there stays intact until the new one is complete.

Loads trust nothing in the files: no pickle is read with arbitrary globals (``.metadata``
through a restricted unpickler, everything else ``weights_only=True``), checksums written
with every checkpoint are verified, and the ranks agree on what they found before any
collective read, so a hostile, corrupt or partly visible checkpoint raises the same error
on every rank instead of running code, loading garbage or hanging.

Every function here is collective over the default process group when one is
initialized: call it on every rank.

Example::

    >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    >>> extra = load_checkpoint("ckpt/step_100", model, optimizer)   # any TP size
    >>> save_full_state_dict(model, "model.safetensors")
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ._integrity import (
    MANIFEST,
    SAFETENSORS_KEY,
    check_files,
    check_safetensors,
    check_zip,
    digest_files,
    read_manifest,
    refusal_reason,
    safetensors_checksums,
    write_manifest,
)
from .random import get_rng_state, set_rng_state, tp_streams

# ``torch.distributed.checkpoint`` is imported inside the functions that use it: importing
# it loads FSDP and ``torch.distributed.tensor.parallel``, which shardwise never needs.

__all__ = [
    "export_full_state_dict",
    "load_checkpoint",
    "load_full_state_dict",
    "save_checkpoint",
    "save_full_state_dict",
]

PathLike = Union[str, "os.PathLike[str]"]

_EXTRA_FILE = "extra.pt"
_METADATA_FILE = ".metadata"


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


# -- sharded checkpoints (DCP) --------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> None:
    """Write a resharding checkpoint of ``model`` (and ``optimizer``) to the directory ``path``.

    Every rank writes its own shards; replicated tensors are written once. Each rank also
    writes its random state (``rng_<rank>.pt``, unless ``rng=False``), and a checksum
    manifest (``checksums.json``) records every file's CRC-32s for
    :func:`load_checkpoint` to verify. An existing checkpoint at ``path`` is replaced
    only after the new one is complete, in one atomic exchange where the file system
    supports it (Linux ``renameat2``).

    Args:
        path: the checkpoint directory, on a file system every rank can see.
        model: a model parallelized at any size, or a plain one.
        optimizer: its optimizer; the state is stored by parameter name, so it reshards.

    Keyword Args:
        extra: small training state (step, config) written by rank 0 and returned by
            :func:`load_checkpoint`. It must load with ``torch.load(weights_only=True)``:
            tensors, numbers, strings, and lists/tuples/dicts of them.
        rng: save this rank's random state: torch's default generator, CUDA's when in use,
            and the model's tensor-parallel dropout streams, so a resume at the same world
            size draws the same dropout masks as a run that never stopped.

    Example::

        >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    """
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from ._dcp_safe import data_files

    target = Path(path)
    what = f"save_checkpoint('{target}')"
    staging = target.with_name(f".{target.name}.tmp")
    state = _dcp_state(model, optimizer)
    rank, world = _rank(), _world()
    rng_state = get_rng_state(model) if rng else None

    def prepare() -> None:
        _remove(staging)
        staging.mkdir(parents=True)

    def digest_mine(metadata: Any) -> dict[str, Any]:
        names = [n for n in data_files(metadata) if _owner(n, world) == rank]
        if rank == 0:
            names.append(_METADATA_FILE)
        if rng_state is not None:
            name = _rng_file(rank)
            torch.save({"world_size": world, "rank": rank, **rng_state}, staging / name)
            _fsync(staging / name)
            names.append(name)
        return digest_files(staging, names)

    def publish(files: dict[str, Any]) -> None:
        if extra is not None:
            torch.save(dict(extra), staging / _EXTRA_FILE)
            _fsync(staging / _EXTRA_FILE)
            _load_weights_only(staging / _EXTRA_FILE, "extra")  # loadable, or refused now
            files.update(digest_files(staging, [_EXTRA_FILE]))
        write_manifest(staging, files, world_size=world, rng=rng_state is not None)
        _fsync(staging)
        _swap_in(staging, target)

    _replicate_undescribed(state)  # DCP describes Shard/Replicate only

    _on_rank0(prepare)
    try:
        with _dcp_errors(what):
            metadata = dcp_save(state, checkpoint_id=staging)
        # DCP returns only once every rank's files are written, and it raises on every
        # rank if any rank's writer failed. Each rank then checksums its own files.
        mine: dict[str, Any] | None = None
        problem: Exception | None = None
        try:
            mine = digest_mine(metadata)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
            problem = exc
        files: dict[str, Any] = {}
        for part in _agree(what, problem, mine):
            files.update(part)
        _on_rank0(lambda: publish(files))  # also the barrier: all return once it is in place
    except BaseException:
        if rank == 0:
            _remove(staging)
        raise


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
    rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) in place.

    The model may be parallelized at a different size than when it was saved, or not at
    all (with or without a process group). Parameters keep their identity, so an
    optimizer built before the load stays valid.

    Before any rank reads a tensor, every rank checks what it can see, and the ranks
    agree with one small collective; any problem raises the same error, naming the rank,
    file or key, on every rank, and leaves the model untouched and the process group
    usable. Checked: the checkpoint is visible to every rank and is the same one
    everywhere; files match their checksums (each rank hashes its share); ``.metadata``
    holds only DCP metadata (read with a restricted unpickler, so a planted file runs no
    code); keys and global shapes fit ``model``. Non-tensor entries are read with
    ``weights_only=True``. If a save was interrupted between its two renames (file
    systems without an atomic exchange), the surviving ``.<name>.old`` copy is loaded,
    with a warning.

    Args:
        path: the checkpoint directory.
        model: the model to fill.
        optimizer: the optimizer to fill; the checkpoint must hold optimizer state.

    Keyword Args:
        strict: also reject model tensors in the checkpoint that ``model`` lacks.
        rng: restore each rank's random state saved with the checkpoint (default
            generator, CUDA's, the model's tensor-parallel streams), so training resumes
            bit-exactly. Only at the world size it was saved at: a load at another size
            (resharding) leaves the random state as it is.
        verify: check file contents against the checksum manifest (sizes are always
            checked).

    Returns:
        The ``extra`` dict passed to :func:`save_checkpoint` (empty if none was).

    Example::

        >>> model = parallelize_module(MLP(), mesh_of(2), PairwiseParallel())
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> step = load_checkpoint("ckpt/step_100", model, optimizer)["step"]
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from ._dcp_safe import SafeLoadPlanner, SafeReader

    target = Path(path)
    what = f"load_checkpoint('{target}')"
    state = _dcp_state(model, optimizer)
    found: _Found | None = None
    problem: Exception | None = None
    try:
        found = _open_checkpoint(target, model, state, strict, rng, verify)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
        problem = exc
    seen = _agree(what, problem, None if found is None else found.token)
    if len(set(seen)) > 1:
        views = "; ".join(
            f"rank {r}: '{d}' (manifest {m or 'none'})" for r, (d, m) in enumerate(seen)
        )
        raise RuntimeError(f"{what}: the ranks see different checkpoints: {views}.")
    assert found is not None
    for note in found.notes:
        warnings.warn(note, stacklevel=2)

    swapped = _replicate_undescribed(state)
    with _dcp_errors(what):
        dcp_load(
            state,
            storage_reader=SafeReader(found.directory, found.metadata),
            planner=SafeLoadPlanner(),
        )
    with torch.no_grad():
        for container, key, original in swapped:
            loaded = container[key].redistribute(original.device_mesh, original.placements)
            original.to_local().copy_(loaded.to_local())
            container[key] = original
    set_state_dict(
        model,
        () if optimizer is None else optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )
    if found.rng is not None:
        set_rng_state(model, found.rng)
    return found.extra


@dataclass
class _Found:
    """What one rank found and checked at a checkpoint path, before any collective."""

    directory: Path
    metadata: Any
    token: tuple[str, str]  # (directory, manifest digest): must agree across ranks
    extra: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _open_checkpoint(
    target: Path,
    model: nn.Module,
    state: dict[str, Any],
    strict: bool,
    rng: bool,
    verify: bool,
) -> _Found:
    """This rank's checks of the checkpoint at ``target``; raises on the first problem."""
    from ._dcp_safe import check_entries, data_files, read_metadata

    rank, world = _rank(), _world()
    notes: list[str] = []
    directory = target
    if not (target / _METADATA_FILE).is_file():
        aside = _aside(target)
        if target.exists() or not (aside / _METADATA_FILE).is_file():
            raise FileNotFoundError(f"no checkpoint at '{target}' (no .metadata file)")
        directory = aside
        notes.append(
            f"load_checkpoint: no checkpoint at '{target}'; loading the complete one left at "
            f"'{aside}' by a save interrupted while replacing it. The next save_checkpoint "
            f"to '{target}' removes it."
        )
    manifest, manifest_digest = read_manifest(directory)
    files: dict[str, Any] = {} if manifest is None else manifest["files"]
    if manifest is None:
        notes.append(
            f"load_checkpoint: '{directory}' has no {MANIFEST} (written by another tool or an "
            "older shardwise): its files are not checked for corruption."
        )
    reads = [_METADATA_FILE, _EXTRA_FILE, _rng_file(rank)]
    shared = [n for n in files if _owner(n, world) == rank] + reads if verify else []
    problems = check_files(directory, files, shared)
    if problems:
        raise RuntimeError("; ".join(problems))
    metadata = read_metadata(directory / _METADATA_FILE)
    unlisted = sorted(data_files(metadata) - files.keys()) if manifest is not None else []
    if unlisted:
        raise RuntimeError(f"{unlisted} are read by .metadata but missing from {MANIFEST}")
    _check_metadata(metadata, state, strict)
    check_entries(directory, metadata)
    found = _Found(directory, metadata, (str(directory), manifest_digest), notes=notes)
    if (directory / _EXTRA_FILE).is_file():
        found.extra = dict(_load_weights_only(directory / _EXTRA_FILE, "extra"))
    # Random state resumes only at the world size it was saved at: a resharded run cannot
    # repeat the old one's draws (nor its reductions) anyway, so nothing is said then.
    saved_rng = manifest is not None and manifest.get("rng") and manifest["world_size"] == world
    if rng and saved_rng:
        saved = _load_weights_only(directory / _rng_file(rank), "random state")
        streams = len(tp_streams(model))
        if not isinstance(saved, dict) or len(saved.get("tp", ())) != streams:
            notes.append(
                f"load_checkpoint: random state not restored: the checkpoint holds "
                f"{len(saved.get('tp', ())) if isinstance(saved, dict) else 'no'} "
                f"tensor-parallel stream(s) for rank {rank}, the model {streams} (a "
                "different model or plan; pass rng=False to silence this)."
            )
        else:
            found.rng = saved
    return found


def _load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a refusal raises naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
        raise RuntimeError(
            f"refusing '{path}' ({what}): it does not load with weights_only=True ({refusal_reason(exc)})"
        ) from None


def _owner(name: str, world: int) -> int:
    """The rank that checksums file ``name``: its writer (``__3_0.distcp``, ``rng_3.pt``)
    modulo the world size, else rank 0."""
    match = re.match(r"^(?:__|rng_)(\d+)[_.]", name)
    return int(match.group(1)) % world if match else 0


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` keyed by canonical parameter names (DTensors kept)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, () if optimizer is None else optimizer)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    return state


def _replicate_undescribed(tree: Any) -> list[tuple[Any, Any, DTensor]]:
    """Swap each DTensor whose layout DCP cannot describe for a replicated copy, in place.

    DCP's metadata holds one contiguous chunk per rank, so it saves ``Shard`` and
    ``Replicate`` but rejects ``_StridedShard`` (GPT-2's fused ``c_attn``, each rank
    holding a slice of q, of k and of v) as "overlapping chunks". Replicated copies save
    and load like any replicated tensor. Returns ``(container, key, original)`` for each
    swap, so a load can copy the values back into the originals' own layout.
    """
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, list):
        items = list(enumerate(tree))
    else:
        return []
    swapped: list[tuple[Any, Any, DTensor]] = []
    for key, value in items:
        if isinstance(value, DTensor):
            if not all(type(p) in (Shard, Replicate) for p in value.placements):
                with torch.no_grad():
                    replicated = [Replicate()] * value.device_mesh.ndim
                    tree[key] = value.redistribute(value.device_mesh, replicated)
                swapped.append((tree, key, value))
        elif isinstance(value, (dict, list)):
            swapped.extend(_replicate_undescribed(value))
    return swapped


@contextlib.contextmanager
def _dcp_errors(what: str) -> Iterator[None]:
    """Quiet DCP's single-process warning (intended here) and turn its failure report,
    a ``BaseException`` that ``except Exception`` would miss, into a ``RuntimeError``
    raised on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as exc:
        failed = "; ".join(
            f"rank {rank}: {type(error).__name__}: {error}"
            for rank, (error, _) in sorted(exc.failures.items())
        )
        raise RuntimeError(f"{what} failed on {failed}") from exc


def _check_metadata(metadata: Any, state: dict[str, Any], strict: bool) -> None:
    """Raise, naming the keys, when ``state`` cannot be filled from the checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = metadata.state_dict_metadata
    found = {
        key.removeprefix("model."): meta.size if isinstance(meta, TensorStorageMetadata) else None
        for key, meta in saved.items()
        if key.startswith("model.")
    }
    wanted = {k: v.shape for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    problems = _mismatches(wanted, found, strict, "the checkpoint")
    if "optim" in state and not any(k.startswith("optim.") for k in saved):
        problems.append("an optimizer was passed but the checkpoint holds no optimizer state")
    if problems:
        raise RuntimeError("; ".join(problems))


def _mismatches(
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


# -- full (single-device) state dicts -------------------------------------------------


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
            _fsync(staging)
            _swap_in(staging, target)
        except BaseException:
            _remove(staging)
            raise

    _on_rank0(write)


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
        problems = _mismatches(wanted, found, strict, "the state dict")
        if problems:
            raise RuntimeError("; ".join(problems) + ".")
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
        problem = exc
    _agree("load_full_state_dict", problem)
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
    state = _load_weights_only(path, "a full state dict")
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
        target._local_tensor.copy_(mine._local_tensor)
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


# -- rank-0 file operations -------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


_RAISED_AS_IS = (FileNotFoundError, RuntimeError, TypeError)  # anything else: RuntimeError


def _agree(what: str, problem: Exception | None, token: Any = None) -> list[Any]:
    """Exchange each rank's outcome (one small all-gather); raise on every rank if any failed.

    Returns every rank's ``token`` when none failed. When all ranks failed alike, the
    error keeps its type (``FileNotFoundError``...); otherwise a ``RuntimeError`` names
    each failing rank. No rank returns early, so none is left waiting in a collective.
    """
    report = None if problem is None else (type(problem).__name__, str(problem).rstrip("."))
    if dist.is_initialized():
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (report, token))
    else:
        outcomes = [(report, token)]
    failed = {r: rep for r, (rep, _) in enumerate(outcomes) if rep is not None}
    if not failed:
        return [tok for _, tok in outcomes]
    distinct = set(failed.values())
    if len(failed) == len(outcomes) and len(distinct) == 1:
        kind, message = distinct.pop()
        cls = next((c for c in _RAISED_AS_IS if c.__name__ == kind), RuntimeError)
        raise cls(f"{what}: {message}.") from problem
    groups: dict[tuple[str, str], list[int]] = {}
    for r, rep in failed.items():
        groups.setdefault(rep, []).append(r)
    parts = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {message}"
        for (_, message), rs in groups.items()
    )
    scope = (
        "every rank" if len(failed) == len(outcomes) else f"{len(failed)} of {len(outcomes)} ranks"
    )
    raise RuntimeError(f"{what} failed on {scope}, so on all: {parts}.") from problem


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0; every rank returns after it, or raises if it failed.

    Rank 0 broadcasts its outcome, so a failure there cannot leave the others waiting
    in a barrier, and a non-zero rank never returns before rank 0 finished ``fn``.
    """
    failure: BaseException | None = None
    if _rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the others know
            failure = exc
    if dist.is_initialized():
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)
        if failure is None and outcome[0] is not None:
            raise RuntimeError(f"rank 0 failed to write the checkpoint: {outcome[0]}")
    if failure is not None:
        raise failure


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the C library or file system lacks it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _swap_in(staging: Path, target: Path) -> None:
    """Move ``staging`` onto ``target``, replacing what is there, in one atomic step.

    A file replaces a file with ``os.replace``; a directory replaces a checkpoint
    directory with an atomic exchange (``staging`` then holds the old one and is removed).
    Where the file system cannot exchange, the old directory is renamed aside to
    ``.<name>.old`` first; a crash between the two renames leaves the old checkpoint
    complete there, and :func:`load_checkpoint` loads it. The aside copy, or one an
    earlier crash left, is removed once the new checkpoint is in place.
    """
    aside = _aside(target)
    if target.is_dir() and not target.is_symlink():
        if _exchange(staging, target):
            _fsync(target.parent)
            _remove(staging)
        else:
            _remove(aside)
            os.replace(target, aside)
            os.replace(staging, target)
            _fsync(target.parent)
    else:
        os.replace(staging, target)
        _fsync(target.parent)
    if target.is_dir():
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
