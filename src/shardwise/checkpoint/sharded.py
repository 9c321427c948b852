"""Sharded checkpoints that reshard: save at one tensor-parallel size, load at another.

:func:`save_checkpoint` writes a directory through ``torch.distributed.checkpoint``
(DCP). Each rank writes only its own shards; the metadata records every tensor's global
shape and which slice each file holds, so a load at any tensor-parallel size reads
exactly the slices its new shards need. Model and optimizer state (momentum,
``exp_avg``, ...) both reshard, and the same directory loads into a plain,
unparallelized model, with or without a process group.

Writes are atomic. A checkpoint is written into a temporary sibling (``.<name>.tmp``)
and moved onto ``path`` by rank 0 only after every rank has finished writing, so a
crash or a failed write never leaves a half checkpoint at ``path``; an older
checkpoint there stays intact until the new one is complete.

Loads trust nothing in the files: no pickle is read with arbitrary globals (``.metadata``
through a restricted unpickler, everything else ``weights_only=True``), checksums written
with every checkpoint are verified, and the ranks agree on what they found before any
collective read, so a hostile, corrupt or partly visible checkpoint raises the same error
on every rank instead of running code, loading garbage or hanging.

Both functions are collective over the default process group when one is initialized:
call them on every rank.

Example::

    >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    >>> extra = load_checkpoint("ckpt/step_100", model, optimizer)   # any TP size
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from .._engine import consensus
from ..random import get_rng_state, set_rng_state, tp_streams
from .files import PathLike, aside_path, fsync, remove, swap_in
from .full import mismatches
from .integrity import (
    MANIFEST,
    check_files,
    digest_files,
    load_weights_only,
    read_manifest,
    write_manifest,
)

# ``torch.distributed.checkpoint`` is imported inside the functions that use it: importing
# it loads FSDP and ``torch.distributed.tensor.parallel``, which shardwise never needs.

__all__ = ["load_checkpoint", "save_checkpoint"]

_EXTRA_FILE = "extra.pt"
_METADATA_FILE = ".metadata"


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


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

    from .safe_dcp import data_files

    target = Path(path)
    what = f"save_checkpoint('{target}')"
    staging = target.with_name(f".{target.name}.tmp")
    state = _dcp_state(model, optimizer)
    rank, world = consensus.rank(), consensus.world()
    rng_state = get_rng_state(model) if rng else None

    def prepare() -> None:
        remove(staging)
        staging.mkdir(parents=True)

    def digest_mine(metadata: Any) -> dict[str, Any]:
        names = [n for n in data_files(metadata) if _owner(n, world) == rank]
        if rank == 0:
            names.append(_METADATA_FILE)
        if rng_state is not None:
            name = _rng_file(rank)
            torch.save({"world_size": world, "rank": rank, **rng_state}, staging / name)
            fsync(staging / name)
            names.append(name)
        return digest_files(staging, names)

    def publish(files: dict[str, Any]) -> None:
        if extra is not None:
            torch.save(dict(extra), staging / _EXTRA_FILE)
            fsync(staging / _EXTRA_FILE)
            load_weights_only(staging / _EXTRA_FILE, "extra")  # loadable, or refused now
            files.update(digest_files(staging, [_EXTRA_FILE]))
        write_manifest(staging, files, world_size=world, rng=rng_state is not None)
        fsync(staging)
        swap_in(staging, target)

    _replicate_undescribed(state)  # DCP describes Shard/Replicate only

    consensus.on_rank0(prepare)
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
        for part in consensus.agree(what, problem, mine):
            files.update(part)
        consensus.on_rank0(lambda: publish(files))  # also the barrier: all return once it is in place
    except BaseException:
        if rank == 0:
            remove(staging)
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

    from .safe_dcp import SafeLoadPlanner, SafeReader

    target = Path(path)
    what = f"load_checkpoint('{target}')"
    state = _dcp_state(model, optimizer)
    found: _Found | None = None
    problem: Exception | None = None
    try:
        found = _open_checkpoint(target, model, state, strict, rng, verify)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
        problem = exc
    seen = consensus.agree(what, problem, None if found is None else found.token)
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
    from .safe_dcp import check_entries, data_files, read_metadata

    rank, world = consensus.rank(), consensus.world()
    notes: list[str] = []
    directory = target
    if not (target / _METADATA_FILE).is_file():
        aside = aside_path(target)
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
        found.extra = dict(load_weights_only(directory / _EXTRA_FILE, "extra"))
    # Random state resumes only at the world size it was saved at: a resharded run cannot
    # repeat the old one's draws (nor its reductions) anyway, so nothing is said then.
    saved_rng = manifest is not None and manifest.get("rng") and manifest["world_size"] == world
    if rng and saved_rng:
        saved = load_weights_only(directory / _rng_file(rank), "random state")
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
    problems = mismatches(wanted, found, strict, "the checkpoint")
    if "optim" in state and not any(k.startswith("optim.") for k in saved):
        problems.append("an optimizer was passed but the checkpoint holds no optimizer state")
    if problems:
        raise RuntimeError("; ".join(problems))
