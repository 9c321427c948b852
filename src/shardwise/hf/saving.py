"""Write a tensor-parallel model as a Hugging Face checkpoint directory.

:func:`save_pretrained` writes what ``transformers.AutoModelForCausalLM.from_pretrained``
reads on one device: ``config.json`` (and ``generation_config.json``) plus safetensors
files, one ``model.safetensors`` or, above ``max_shard_size``, numbered shards with a
``model.safetensors.index.json``. No pickle.

The shards are planned from global shapes before anything moves. Then tensors are
gathered one at a time (each DTensor's ``full_tensor()``, a collective) and rank 0 keeps
only the current file's tensors, so no rank ever holds the whole model. Rank 0 writes
into a temporary sibling directory and renames it onto ``path`` once everything is
written: a failed or interrupted save never leaves a half checkpoint at ``path``.

Example::

    >>> save_pretrained(tp_model, "ckpt", max_shard_size="2GB")   # on every rank
    >>> AutoModelForCausalLM.from_pretrained("ckpt")               # one device
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .._engine.consensus import on_rank0
from ..checkpoint.files import fsync, remove, swap_in
from .loading import INDEX_FILE, SINGLE_FILE

__all__ = ["save_pretrained", "shard_size_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size_bytes(size: int | str) -> int:
    """Bytes in a shard size given as an int or a string such as ``"5GB"`` or ``"200KiB"``.

    Example::

        >>> shard_size_bytes("5GB"), shard_size_bytes("2KiB")
        (5000000000, 2048)
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or e.g. '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors by name, each tied tensor once (under its first name)."""
    seen: set[int] = set()
    out = []
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            out.append((name, value))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # global numel for a DTensor


def _plan_shards(
    tensors: list[tuple[str, torch.Tensor]], limit: int
) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``limit`` bytes (a bigger tensor gets a file alone)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += _nbytes(t)
    return shards


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def save_pretrained(
    model: nn.Module, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB"
) -> None:
    """Write ``model`` (parallelized or not) as a Hugging Face checkpoint directory at ``path``.

    Collective: call it on every rank. An existing directory at ``path`` is replaced
    only after the new checkpoint is complete; every rank returns once it is in place,
    or raises the same error if rank 0 could not write it.

    Args:
        model: a ``transformers`` ``PreTrainedModel``, e.g. from
            :func:`shardwise.hf.from_pretrained` or :func:`shardwise.hf.parallelize_hf`.
        path: the directory to write.

    Keyword Args:
        max_shard_size: the most bytes per safetensors file (int, or ``"5GB"``); a larger
            model is split into ``model-0000i-of-0000n.safetensors`` plus an index.

    Example::

        >>> save_pretrained(model, "ckpt", max_shard_size="500MB")
    """
    limit = shard_size_bytes(max_shard_size)
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise TypeError(
            f"save_pretrained expects a transformers model (with .config), got {type(model).__name__}."
        )
    target = Path(path)
    staging = target.with_name(f".{target.name}.tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    shards = _plan_shards(_tensors(model), limit)
    count = len(shards)
    names = (
        [SINGLE_FILE]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    failure: Exception | None = None
    if rank0:
        try:
            remove(staging)
            staging.mkdir(parents=True)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            failure = exc
    for file, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for name, t in shard:  # one gather at a time, on every rank
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if rank0:
                tensors[name] = full.detach().to("cpu", copy=True).contiguous()
            del full
        if rank0 and failure is None:
            try:
                save_file(tensors, os.fspath(staging / file), metadata={"format": "pt"})
                fsync(staging / file)
            except Exception as exc:  # noqa: BLE001 - keep gathering: the others are
                failure = exc
        del tensors

    def publish() -> None:
        if failure is not None:
            remove(staging)
            raise failure
        try:
            if count > 1:
                weight_map = {name: file for file, shard in zip(names, shards) for name, _ in shard}
                total = sum(_nbytes(t) for shard in shards for _, t in shard)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
            hf_model: Any = model  # a transformers PreTrainedModel
            config = copy.deepcopy(hf_model.config)
            dtype = _model_dtype(model)
            if dtype is not None:
                config.dtype = dtype
            config.save_pretrained(staging)
            generation = getattr(hf_model, "generation_config", None)
            if generation is not None and hf_model.can_generate():
                generation.save_pretrained(staging)
            fsync(staging)
            swap_in(staging, target)
        except BaseException:
            remove(staging)
            raise

    on_rank0(publish)
