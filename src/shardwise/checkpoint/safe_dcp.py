"""DCP reads that run no code from the checkpoint.

Stock DCP reads ``.metadata`` with ``pickle.load`` and non-tensor entries (an optimizer's
``lr``, ``betas``...) with ``torch.load(weights_only=False)``: a planted file runs
arbitrary code. shardwise reads ``.metadata`` with an unpickler that resolves only DCP's
own metadata classes (and ``torch.Size``, dtypes, layouts, paths), checks that every file
it names is a plain file name inside the checkpoint, and hands DCP that metadata through
:class:`SafeReader`; :class:`SafeLoadPlanner` reads non-tensor entries with
``weights_only=True``. (Tensors DCP already reads with ``weights_only=True``.)

Imported lazily: importing ``torch.distributed.checkpoint`` loads FSDP and more.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import ReadItem

from .._engine.torch_compat import dcp_set_element, dcp_storage_info_class
from .integrity import refusal_reason

_METADATA_CLASSES = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((module, cls) for module in ("pathlib", "pathlib._local") for cls in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath",
    )),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` file holds; refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"it refers to '{module}.{name}', which no checkpoint metadata holds"
        )


def read_metadata(path: Path) -> Metadata:
    """Read and check a DCP ``.metadata`` file without running code from it.

    Raises ``ValueError`` naming the file when it holds anything but DCP metadata.
    """
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"refusing to read '{path}': {exc}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(
            f"refusing to read '{path}': it holds a {type(metadata).__name__}, not DCP metadata"
        )
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
        metadata.storage_data, dict
    ):
        raise ValueError(f"refusing to read '{path}': malformed DCP metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if (
            not isinstance(info, dcp_storage_info_class())
            or not isinstance(name, str)
            or name in ("", ".", "..")
            or os.path.basename(name) != name
            or "\\" in name
        ):
            raise ValueError(
                f"refusing to read '{path}': it points at {name!r}, not a file of the checkpoint"
            )
    return metadata


def check_entries(directory: Path, metadata: Metadata) -> None:
    """Read every non-tensor entry (an optimizer's ``lr``...) with ``weights_only=True``
    before DCP reads anything, so a planted one raises, naming the entry, with the model
    untouched. (:class:`SafeLoadPlanner` refuses them again during the read.)"""
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, BytesStorageMetadata):
            continue
        info = metadata.storage_data.get(MetadataIndex(fqn))
        if info is None or getattr(info, "transform_descriptors", None):
            continue  # not stored plainly: left to SafeLoadPlanner
        with open(directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        _weights_only(fqn, io.BytesIO(raw))


def _weights_only(fqn: str, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
        raise RuntimeError(
            f"refusing non-tensor entry '{fqn}': it does not load with "
            f"weights_only=True ({refusal_reason(exc)})"
        ) from None


def data_files(metadata: Metadata) -> set[str]:
    """The data files (``__0_0.distcp``...) that ``metadata`` reads from."""
    return {info.relative_path for info in metadata.storage_data.values()}


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` that hands DCP metadata already read by :func:`read_metadata`."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._checked_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._checked_metadata
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None:
            storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = _weights_only(fqn, value)
        if self.flatten_state_dict:
            dcp_set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
