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
  placements: every rank reads the file, and no collective runs.

Writes are atomic. A checkpoint is written into a temporary sibling (``.<name>.tmp``)
and renamed onto ``path`` by rank 0 only after every rank has finished writing, so a
crash or a failed write never leaves a half checkpoint at ``path``; an older
checkpoint there stays intact until the new one is complete.

Every function here is collective over the default process group when one is
initialized: call it on every rank.

Example::

    >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    >>> extra = load_checkpoint("ckpt/step_100", model, optimizer)   # any TP size
    >>> save_full_state_dict(model, "model.safetensors")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

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


# -- sharded checkpoints (DCP) --------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a resharding checkpoint of ``model`` (and ``optimizer``) to the directory ``path``.

    Every rank writes its own shards; replicated tensors are written once. An existing
    checkpoint at ``path`` is replaced only after the new one is complete.

    Args:
        path: the checkpoint directory, on a file system every rank can see.
        model: a model parallelized at any size, or a plain one.
        optimizer: its optimizer; the state is stored by parameter name, so it reshards.

    Keyword Args:
        extra: small training state (step, RNG states, config) written by rank 0 and
            returned by :func:`load_checkpoint`. It must load with
            ``torch.load(weights_only=True)``: tensors, numbers, strings, and
            lists/tuples/dicts of them.

    Example::

        >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    """
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    target = Path(path)
    staging = target.with_name(f".{target.name}.tmp")
    state = _dcp_state(model, optimizer)

    def prepare() -> None:
        _remove(staging)
        staging.mkdir(parents=True)

    def publish() -> None:
        if extra is not None:
            torch.save(dict(extra), staging / _EXTRA_FILE)
        _swap_in(staging, target)

    _replicate_undescribed(state)  # DCP describes Shard/Replicate only

    _on_rank0(prepare)
    try:
        with _dcp_errors(f"save_checkpoint('{target}')"):
            dcp_save(state, checkpoint_id=staging)
        # DCP returns only once every rank's files are written, and it raises on every
        # rank if any rank's writer failed; ``_on_rank0`` then doubles as the barrier.
        _on_rank0(publish)
    except BaseException:
        if _rank() == 0:
            _remove(staging)
        raise


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) in place.

    The model may be parallelized at a different size than when it was saved, or not at
    all (with or without a process group). Parameters keep their identity, so an
    optimizer built before the load stays valid. Keys and global shapes are checked
    against the checkpoint before anything is read, and a mismatch raises the same
    error, naming the keys, on every rank.

    Args:
        path: the checkpoint directory.
        model: the model to fill.
        optimizer: the optimizer to fill; the checkpoint must hold optimizer state.

    Keyword Args:
        strict: also reject model tensors in the checkpoint that ``model`` lacks.

    Returns:
        The ``extra`` dict passed to :func:`save_checkpoint` (empty if none was).

    Example::

        >>> model = parallelize_module(MLP(), mesh_of(2), PairwiseParallel())
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> step = load_checkpoint("ckpt/step_100", model, optimizer)["step"]
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    source = Path(path)
    if not (source / ".metadata").is_file():
        raise FileNotFoundError(
            f"load_checkpoint: no checkpoint at '{source}' (no .metadata file)."
        )
    state = _dcp_state(model, optimizer)
    _check_metadata(source, state, strict)
    swapped = _replicate_undescribed(state)
    with _dcp_errors(f"load_checkpoint('{source}')"):
        dcp_load(state, checkpoint_id=source)
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
    extra_file = source / _EXTRA_FILE
    if not extra_file.is_file():
        return {}
    return dict(torch.load(extra_file, weights_only=True))


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


def _check_metadata(source: Path, state: dict[str, Any], strict: bool) -> None:
    """Raise, naming the keys, when ``state`` cannot be filled from the checkpoint."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(source).read_metadata().state_dict_metadata
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
        raise RuntimeError(f"load_checkpoint('{source}'): " + "; ".join(problems) + ".")


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
                save_safetensors(_unshared(tensors), os.fspath(staging), metadata={"format": "pt"})
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
    runs, and the Parameter objects an optimizer holds stay the same. Plain tensors are
    copied whole; values are cast to the model's dtypes. Every rank reads the file
    itself, so it must be visible to all.

    Everything is checked before anything is copied: missing keys, unexpected keys (with
    ``strict``) and global shape mismatches raise one ``RuntimeError`` naming the keys,
    the same on every rank, and leave the model untouched.

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
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        state = _read_full(Path(path_or_state_dict))
    targets = {
        name: t
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor)
    }
    found = {k: v.shape if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    problems = _mismatches(
        {k: t.shape for k, t in targets.items()}, found, strict, "the state dict"
    )
    if problems:
        raise RuntimeError("load_full_state_dict: " + "; ".join(problems) + ".")
    with torch.no_grad():
        for name, target in targets.items():
            if name in state:
                _copy_full_into(target, state[name])


def _read_full(path: Path) -> Mapping[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        return load_safetensors(os.fspath(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(
            f"load_full_state_dict: '{path}' holds a {type(state).__name__}, not a dict."
        )
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


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``, replacing what is there.

    A file replaces a file atomically. A directory cannot replace a non-empty one in
    one rename, so an old checkpoint directory is first renamed aside to
    ``.<name>.old`` and removed after the new one is in place; a crash between the two
    renames leaves no half checkpoint, only the old one under the aside name.
    """
    aside = target.with_name(f".{target.name}.old")
    replaced = target.is_dir() and not target.is_symlink()
    if replaced:
        _remove(aside)
        os.replace(target, aside)
    os.replace(staging, target)
    _fsync(target.parent)
    if replaced:
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
