"""Checksums for checkpoint files: a manifest for checkpoint directories, and in-file checks
for single ``.pt`` / ``.safetensors`` files.

A checkpoint directory holds ``checksums.json``: every file's size and the CRC-32 of each
64 MiB chunk of it. Chunks are hashed by a few threads (``zlib`` releases the GIL), so a
large file is checked in parallel. CRC-32 detects corruption (flipped bits, truncation, a
swapped block); it is no defence against a deliberate forger, who can rewrite the manifest
too. That is what the restricted readers are for: no file a checkpoint holds is ever
unpickled with arbitrary globals.

Single files carry their checks inside, so they stay single and readable by stock tools:
``torch.save`` writes a zip archive with a CRC-32 per record, checked here with
:mod:`zipfile`; a safetensors file shardwise writes holds each tensor's CRC-32 in its header
metadata (``shardwise.crc32``).
"""

from __future__ import annotations

import ctypes
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

MANIFEST = "checksums.json"
CHUNK_BYTES = 64 << 20
_READ_BYTES = 8 << 20
_FORMAT = "shardwise-checksums"
SAFETENSORS_KEY = "shardwise.crc32"


def _threads(tasks: int) -> int:
    return max(1, min(4, os.cpu_count() or 1, tasks))


def _crc_range(path: Path, start: int, length: int) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(left, _READ_BYTES))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return f"{crc:08x}"


def _chunks(size: int) -> list[tuple[int, int]]:
    return [(start, min(CHUNK_BYTES, size - start)) for start in range(0, size, CHUNK_BYTES)] or [
        (0, 0)
    ]


def digest_files(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, "crc32": [one hex digest per 64 MiB chunk]}}`` for ``names``."""
    sizes = {name: (directory / name).stat().st_size for name in sorted(set(names))}
    tasks = [
        (name, start, length) for name, size in sizes.items() for start, length in _chunks(size)
    ]
    with ThreadPoolExecutor(_threads(len(tasks))) as pool:
        crcs = list(pool.map(lambda t: _crc_range(directory / t[0], t[1], t[2]), tasks))
    out: dict[str, dict[str, Any]] = {
        name: {"size": size, "crc32": []} for name, size in sizes.items()
    }
    for (name, _, _), crc in zip(tasks, crcs):
        out[name]["crc32"].append(crc)
    return out


def check_files(
    directory: Path, expected: Mapping[str, Mapping[str, Any]], hash_names: Iterable[str]
) -> list[str]:
    """Problems with the files ``expected`` lists: each must exist with its recorded size,
    and those in ``hash_names`` must match their chunk digests. Empty when all is well."""
    problems: list[str] = []
    to_hash: list[tuple[str, int, int, str]] = []
    wanted = set(hash_names)
    for name in sorted(expected):
        entry = expected[name]
        path = directory / name
        if not path.is_file():
            problems.append(f"'{name}' is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(
                f"'{name}' is {size} bytes, the manifest says {entry['size']} (truncated or replaced)"
            )
            continue
        if name in wanted:
            for (start, length), crc in zip(_chunks(size), entry["crc32"]):
                to_hash.append((name, start, length, crc))
    with ThreadPoolExecutor(_threads(len(to_hash))) as pool:
        got = list(pool.map(lambda t: _crc_range(directory / t[0], t[1], t[2]), to_hash))
    bad: dict[str, tuple[int, int]] = {}
    for (name, start, length, crc), actual in zip(to_hash, got):
        if actual != crc and name not in bad:
            bad[name] = (start, start + length)
    for name, (start, end) in bad.items():
        problems.append(
            f"'{name}' fails its checksum (bytes {start}-{end} differ from when it was written): "
            "the file is corrupt"
        )
    return problems


def _self_crc(body: Mapping[str, Any]) -> str:
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def write_manifest(directory: Path, files: Mapping[str, Any], **fields: Any) -> None:
    """Write ``checksums.json`` (with a checksum of its own) into ``directory`` and flush it."""
    body = {
        "format": _FORMAT,
        "version": 1,
        "algorithm": "crc32",
        "chunk_bytes": CHUNK_BYTES,
        "files": dict(files),
        **fields,
    }
    body["self_crc32"] = _self_crc(body)
    path = directory / MANIFEST
    with open(path, "w") as f:
        json.dump(body, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, digest of its bytes)``, or ``(None, "")`` when there is none.

    Raises ``ValueError`` naming the file when it is unreadable or fails its own checksum.
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None, ""
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise ValueError("not a shardwise checksum manifest")
        claimed = body.pop("self_crc32", None)
        if claimed != _self_crc(body) or body.get("algorithm") != "crc32":
            raise ValueError("it fails its own checksum")
        if body.get("chunk_bytes") != CHUNK_BYTES or not isinstance(body.get("files"), dict):
            raise ValueError("unsupported layout")
        for name in body["files"]:
            if os.path.basename(name) != name or name in ("", ".", "..") or "\\" in name:
                raise ValueError(f"it lists {name!r}, not a file of the checkpoint")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"'{MANIFEST}' is corrupt ({exc})") from None
    return body, f"{zlib.crc32(raw):08x}"


def refusal_reason(exc: BaseException) -> str:
    """The informative line of a ``torch.load(weights_only=True)`` refusal (which global it
    met), without torch's boilerplate about re-running with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Check the documentation", "(1)", "(2)", "Weights only load failed")
    for line in lines:
        if not line.startswith(boilerplate):
            return line
    return lines[0] if lines else type(exc).__name__


# -- single files ----------------------------------------------------------------------


def load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a refusal raises naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
        raise RuntimeError(
            f"refusing '{path}' ({what}): it does not load with weights_only=True ({refusal_reason(exc)})"
        ) from None


def tensor_crc(t: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's bytes, read in place (no copy for a contiguous tensor)."""
    t = t.detach().contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return f"{0:08x}"
    buffer = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    return f"{zlib.crc32(buffer):08x}"


def safetensors_checksums(tensors: Mapping[str, torch.Tensor]) -> str:
    return json.dumps({name: tensor_crc(t) for name, t in tensors.items()}, sort_keys=True)


def check_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the file and tensor when a loaded tensor's bytes differ
    from the CRC-32 its header records. Files without the record (not written by shardwise)
    are not checked."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if SAFETENSORS_KEY not in metadata:
        return
    try:
        recorded = json.loads(metadata[SAFETENSORS_KEY])
        if not isinstance(recorded, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"'{path}': its checksum record is corrupt") from None
    if set(recorded) != set(tensors):
        raise ValueError(f"'{path}': its checksum record does not list the tensors it holds")
    for name in sorted(tensors):
        if tensor_crc(tensors[name]) != recorded[name]:
            raise ValueError(f"'{path}': tensor '{name}' fails its checksum: the file is corrupt")


def check_zip(path: Path) -> None:
    """Check the CRC-32 of every record of a ``torch.save`` zip archive; raise ``ValueError``
    naming the file and record on a mismatch. Legacy (non-zip) files are not checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ValueError(f"'{path}' is corrupt ({exc})") from None
    if bad is not None:
        raise ValueError(f"'{path}': record '{bad}' fails its CRC-32 check: the file is corrupt")
