"""Load a Hugging Face checkpoint straight into its tensor-parallel shards.

:func:`from_pretrained` never builds the whole model on any rank:

1. **Build on meta.** The model is constructed from ``config.json`` with every parameter
   on the ``meta`` device (no memory). Buffers stay real, so non-persistent ones that the
   checkpoint does not hold (rotary ``inv_freq``) are computed by the model's own code.
2. **Parallelize on meta.** The plan (``"auto"`` by default) is validated and applied
   there: each parameter becomes a DTensor whose local shard is still on meta.
3. **Check, and agree.** Every rank reads the safetensors headers (no data) and checks
   that each parameter is present with its global shape; the ranks exchange what they
   found (one small all-gather), so a missing or misshapen tensor raises the same
   error, naming it, on every rank before any weight is read.
4. **Read only this rank's slices.** Each local shard is read with safetensors'
   ``get_slice`` (the rows or columns this rank owns, several runs for GPT-2's fused
   ``c_attn``) and cast to ``dtype`` slice by slice, so a float32 checkpoint loads into
   bfloat16 without a float32 copy of the model. Tied parameters stay one parameter.

Example::

    >>> mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    >>> model = from_pretrained("checkpoints/llama", mesh, dtype=torch.bfloat16)
    >>> model.generate(ids, max_new_tokens=20)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from .._engine.local_params import with_local_tensor
from ..api import parallelize_module
from ..mesh import tp_submesh
from .plans import auto_plan

__all__ = ["checkpoint_files", "from_pretrained"]

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
READ_BLOCK = 16 * 2**20  # bytes read from a file at a time
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a checkpoint directory.

    Reads ``model.safetensors.index.json`` if there is one, else lists ``model.safetensors``.

    Example::

        >>> checkpoint_files("ckpt")["lm_head.weight"]
        PosixPath('ckpt/model-00002-of-00002.safetensors')
    """
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / SINGLE_FILE
    if single.is_file():
        with safe_open(os.fspath(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"'{root}' holds neither {INDEX_FILE} nor {SINGLE_FILE}.")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers stay real (and computed)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class _Checkpoint:
    """The open safetensors files of one checkpoint, read by tensor name."""

    def __init__(self, files: Mapping[str, Path], stack: contextlib.ExitStack) -> None:
        self.files = files
        self.handles: dict[Path, Any] = {}
        self.stack = stack

    def _slice(self, key: str) -> Any:
        file = self.files[key]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(
                safe_open(os.fspath(file), framework="pt")
            )
        return self.handles[file].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._slice(key).get_dtype())

    def piece(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """One rectangular piece of tensor ``key`` read from its file (a new tensor)."""
        return self._slice(key)[index]

    def read_into(
        self, key: str, out: torch.Tensor, runs: list[tuple[int, int]] | None, dim: int
    ) -> None:
        """Fill ``out`` with tensor ``key`` (``runs=None``), or with the ``[start, stop)`` runs
        of its dimension ``dim`` joined, casting to ``out``'s dtype.

        At most about :data:`READ_BLOCK` bytes are read at a time (rows of dimension 0), so
        loading float32 into bfloat16 never holds a float32 copy of a whole shard.
        """
        shape = self.shape(key)
        if not shape:
            out.copy_(self.piece(key, ()))
            return
        if runs is None:
            runs, dim = [(0, shape[0])], 0
        row_bytes = max(1, out[0].numel() * 4) if out.numel() else 1  # as float32 at most
        offset = 0
        for start, stop in runs:
            dst = out.narrow(dim, offset, stop - start)  # [..., stop - start, ...]
            offset += stop - start
            rows = dst.shape[0]
            step = max(1, READ_BLOCK // row_bytes)
            for r in range(0, rows, step):
                n = min(step, rows - r)
                index = [slice(None)] * len(shape)
                index[dim] = slice(start, stop)
                first = start if dim == 0 else 0
                index[0] = slice(first + r, first + r + n)
                dst.narrow(0, r, n).copy_(self.piece(key, tuple(index)))


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of consecutive values in ``index`` (sorted runs, as given)."""
    runs: list[tuple[int, int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _local_runs(param: DTensor) -> tuple[list[tuple[int, int]] | None, int]:
    """Which runs of which dimension this rank's shard of ``param`` holds (``None``: all).

    DTensor's own splitting is applied to an index vector (no communication), so any
    placement it implements (``Shard``, ``_StridedShard``, uneven chunks) reads right.
    """
    # Shard and _StridedShard (GPT-2's fused c_attn; not a Shard subclass) carry a dim.
    sharded = [p for p in param.placements if not (p.is_replicate() or p.is_partial())]
    if not sharded:
        return None, 0
    if param.device_mesh.ndim != 1:
        raise NotImplementedError("from_pretrained loads parameters on a 1-D mesh only.")
    dim: int = sharded[0].dim  # type: ignore[attr-defined]
    shape = [1] * param.ndim
    shape[dim] = param.shape[dim]
    index = torch.arange(param.shape[dim]).view(shape)
    mine = distribute_tensor(index, param.device_mesh, param.placements, src_data_rank=None)
    return _runs(mine.to_local().flatten()), dim


def _holders(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """Each distinct parameter with every name it is registered under (tied ones have two)."""
    found: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), (param, []))[1].append(name)
    return found


def _key_for(names: list[str], files: Mapping[str, Path], prefix: str) -> str | None:
    """The checkpoint key for a parameter known by ``names`` (older files drop the prefix)."""
    for name in names:
        for key in (name, name.removeprefix(prefix)):
            if key in files:
                return key
    return None


def _problems(model: nn.Module, ckpt: _Checkpoint, prefix: str) -> list[str]:
    """Every parameter the checkpoint lacks or holds with another global shape."""
    problems = []
    for param, names in _holders(model).values():
        key = _key_for(names, ckpt.files, prefix)
        if key is None:
            problems.append(f"'{names[0]}' is missing from the checkpoint")
            continue
        shape = ckpt.shape(key)
        if shape != tuple(param.shape):
            problems.append(
                f"shape mismatch for '{key}': the checkpoint has {shape}, the model "
                f"{tuple(param.shape)}"
            )
    return problems


def _agree(problems: list[str], mesh: DeviceMesh, what: str) -> None:
    """Raise on every rank of ``mesh`` if any rank found a problem (one all-gather)."""
    if dist.is_initialized() and mesh.size() > 1:
        gathered: list[Any] = [None] * mesh.size()
        dist.all_gather_object(gathered, problems, group=mesh.get_group())
        problems = list(dict.fromkeys(p for rank in gathered for p in rank))
    if problems:
        raise RuntimeError(f"{what}: " + "; ".join(problems) + ".")


def _materialize(model: nn.Module, ckpt: _Checkpoint, prefix: str) -> None:
    """Replace every meta parameter by its loaded local shard, in the dtype the model was
    built with (transformers may keep some modules in float32); refill persistent buffers."""
    new: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for old, names in _holders(model).values():
            key = _key_for(names, ckpt.files, prefix)
            assert key is not None  # checked by _problems
            if isinstance(old, DTensor):
                runs, dim = _local_runs(old)
                local = torch.empty(old.to_local().shape, dtype=old.dtype)
                ckpt.read_into(key, local, runs, dim)
                new[id(old)] = with_local_tensor(old, local)
            else:
                value = torch.empty(old.shape, dtype=old.dtype)
                ckpt.read_into(key, value, None, 0)
                new[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in new:
                    module._parameters[name] = new[id(param)]
        for name, buffer in model.named_buffers():
            key = _key_for([name], ckpt.files, prefix)
            if key is not None and buffer is not None:
                ckpt.read_into(key, buffer, None, 0)


def _checkpoint_dtype(config: Any, ckpt: _Checkpoint) -> torch.dtype:
    """What transformers' ``dtype="auto"`` picks: the config's dtype, else the weights'."""
    configured = getattr(config, "dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    if isinstance(configured, str) and isinstance(getattr(torch, configured, None), torch.dtype):
        return getattr(torch, configured)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for key in ckpt.files:
        if ckpt.dtype(key) in names:
            return names[ckpt.dtype(key)]
    return torch.get_default_dtype()


def from_pretrained(
    path: str | os.PathLike[str],
    mesh: DeviceMesh,
    *,
    plan: Mapping[str, Any] | Literal["auto"] = "auto",
    dtype: torch.dtype | None = None,
    tp_mesh_dim: int = 0,
) -> nn.Module:
    """Load a causal LM checkpoint directory, tensor-parallel over ``mesh``, in eval mode.

    The result is the model ``transformers.AutoModelForCausalLM.from_pretrained(path)``
    gives on one device (same logits, ``generate()``, loss), with its weights sharded.
    Each rank allocates only its own shards and reads only its slices of the files
    (see the module docstring); no rank holds the whole model at any point.

    Collective: call it on every rank of ``mesh``.

    Args:
        path: a local directory with ``config.json`` and ``model.safetensors``, or
            ``model.safetensors.index.json`` with its shard files.
        mesh: the device mesh (an n-D mesh is sliced along ``tp_mesh_dim``).

    Keyword Args:
        plan: ``"auto"`` (:func:`shardwise.hf.auto_plan` for the TP size: attention, MLP
            and vocabulary sharded) or a plan dict.
        dtype: the parameters' dtype (e.g. ``torch.bfloat16``); each slice is cast as it
            is read. ``None``: as transformers' ``dtype="auto"``, the config's dtype,
            else the checkpoint's.
        tp_mesh_dim: the mesh dimension to shard over.

    Raises ``RuntimeError`` on every rank, before any weight is read, when a parameter
    is missing from the checkpoint or has another shape there; the message names it.

    Example::

        >>> model = from_pretrained("ckpt", init_device_mesh("cpu", (2,)), dtype=torch.bfloat16)
    """
    import transformers

    root = Path(path)
    config = transformers.AutoConfig.from_pretrained(root)
    tp_mesh = tp_submesh(mesh, tp_mesh_dim)
    with contextlib.ExitStack() as stack:
        try:
            ckpt = _Checkpoint(checkpoint_files(root), stack)
        except (OSError, ValueError, KeyError) as exc:
            # This rank's one _agree call (the others make theirs after their checks).
            _agree([f"{type(exc).__name__}: {exc}"], tp_mesh, f"from_pretrained('{root}')")
            raise  # not reached: _agree raises
        target = dtype if dtype is not None else _checkpoint_dtype(config, ckpt)
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=target)
        if plan == "auto":
            plan = auto_plan(model, tp_size=tp_mesh.size())
        model = parallelize_module(model, mesh, plan, tp_mesh_dim)
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        try:
            problems = _problems(model, ckpt, prefix)
        except Exception as exc:  # noqa: BLE001 - a broken file: reported on every rank
            problems = [f"{type(exc).__name__}: {exc}"]
        _agree(problems, tp_mesh, f"from_pretrained('{root}')")
        _materialize(model, ckpt, prefix)
        unused = set(ckpt.files) - {
            _key_for(names, ckpt.files, prefix) for _, names in _holders(model).values()
        } - {name for name, _ in model.named_buffers()}
        if unused:
            log.info("from_pretrained: checkpoint tensors the model does not use: %s", sorted(unused))
    hf_model: Any = model  # a transformers PreTrainedModel
    if hf_model.can_generate() and (root / "generation_config.json").is_file():
        hf_model.generation_config = transformers.GenerationConfig.from_pretrained(root)
    return model.eval()
