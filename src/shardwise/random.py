"""Dropout randomness under tensor parallelism, on CPU and GPU meshes alike.

Dropout on a *replicated* activation must draw the same mask on every TP rank, or the
ranks' copies silently diverge; dropout on a *sharded* activation (the hidden units of
an MLP pair, the local heads of attention, a sequence shard) must draw a different mask
on each rank, or the mask is correlated across shards. shardwise keeps two streams:

* the **replicated stream** is torch's default generator, which stays in step across
  ranks as long as every rank seeds it the same way (``torch.manual_seed(s)`` or
  :func:`manual_seed`) and draws the same numbers, and
* a **sharded stream** per TP rank, seeded ``seed + 2718 + tp_rank`` (Megatron's
  convention), which sharded-region dropouts use through :meth:`TensorParallelRNG.sharded`.
  Drawing from it leaves the default generator untouched, so replicated regions stay
  in step.

``parallelize_module`` gives the dropouts it knows to be in sharded regions (the
Dropout children between a column- and a row-parallel Linear of an MLP pair, attention
dropout in TensorParallelMultiheadAttention, ``SequenceParallel()`` on ``nn.Dropout``)
a tracker seeded from ``torch.initial_seed()``, so a run is reproducible from its seed.
Unlike DTensor's RNG tracker, this works on CPU (gloo) meshes.

Example::

    >>> rng = manual_seed(1234, mesh)     # same default stream everywhere
    >>> with rng.sharded():
    ...     y = torch.nn.functional.dropout(local_hidden, 0.1)   # differs per TP rank
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "TensorParallelRNG",
    "get_rng_state",
    "manual_seed",
    "set_rng_state",
    "shard_dropout",
]

SHARDED_OFFSET = 2718


def _cuda_in_use(mesh: DeviceMesh) -> bool:
    return mesh.device_type == "cuda" and torch.cuda.is_available()


class TensorParallelRNG:
    """The sharded random stream of one TP rank, swapped in around sharded-region dropout.

    Example::

        >>> rng = TensorParallelRNG(mesh, seed=0)
        >>> with rng.sharded():
        ...     mask = torch.rand(4) > 0.5   # this rank's own draw
    """

    def __init__(self, mesh: DeviceMesh, seed: int) -> None:
        self.mesh = mesh
        self.seed = seed
        self.rank = mesh.get_local_rank()
        stream_seed = seed + SHARDED_OFFSET + self.rank
        self._cpu_state = torch.Generator().manual_seed(stream_seed).get_state()
        self._cuda_state: torch.Tensor | None = None
        if _cuda_in_use(mesh):
            current = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(stream_seed)
            self._cuda_state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(current)

    def __repr__(self) -> str:
        return f"TensorParallelRNG(seed={self.seed}, tp_rank={self.rank})"

    def get_state(self) -> dict[str, Any]:
        """This rank's stream position: ``{"seed", "tp_rank", "cpu", "cuda"}`` (tensors copied).

        Example::

            >>> state = rng.get_state(); ...; rng.set_state(state)   # replay the same draws
        """
        return {
            "seed": self.seed,
            "tp_rank": self.rank,
            "cpu": self._cpu_state.clone(),
            "cuda": None if self._cuda_state is None else self._cuda_state.clone(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume the stream from a :meth:`get_state` result.

        Example::

            >>> rng.set_state(saved)
        """
        self._cpu_state = state["cpu"].clone()
        if state.get("cuda") is not None and self._cuda_state is not None:
            self._cuda_state = state["cuda"].clone()

    @contextmanager
    def sharded(self) -> Iterator[None]:
        """Draw from this rank's sharded stream inside the block; restore the default after.

        Example::

            >>> with rng.sharded():
            ...     y = torch.nn.functional.dropout(x_shard, 0.1)
        """
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(self._cpu_state)
        saved_cuda = None
        if self._cuda_state is not None:
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(self._cuda_state)
        try:
            yield
        finally:
            self._cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                self._cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


def manual_seed(seed: int, mesh: DeviceMesh) -> TensorParallelRNG:
    """Seed torch's default generator identically on every rank and return the sharded stream.

    Example::

        >>> rng = manual_seed(0, mesh)
    """
    torch.manual_seed(seed)
    return TensorParallelRNG(mesh, seed)


def _sharded_dropout_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    rng: TensorParallelRNG = module._shardwise_rng  # type: ignore[assignment]
    if not module.training:
        return type(module).forward(module, *args, **kwargs)
    with rng.sharded():
        return type(module).forward(module, *args, **kwargs)


def shard_dropout(module: nn.Module, rng: TensorParallelRNG) -> nn.Module:
    """Make a dropout module draw its masks from ``rng``'s sharded stream.

    Example::

        >>> shard_dropout(mlp.dropout, TensorParallelRNG(mesh, torch.initial_seed()))
    """
    module._shardwise_rng = rng  # type: ignore[assignment]
    module.forward = types.MethodType(_sharded_dropout_forward, module)
    return module


def tp_streams(model: nn.Module) -> list[TensorParallelRNG]:
    """The distinct sharded streams ``model``'s modules draw from, in module order."""
    seen: dict[int, TensorParallelRNG] = {}
    for module in model.modules():
        rng = getattr(module, "_shardwise_rng", None)
        if isinstance(rng, TensorParallelRNG) and id(rng) not in seen:
            seen[id(rng)] = rng
    return list(seen.values())


def _cuda_rng_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_state(model: nn.Module) -> dict[str, Any]:
    """This rank's random state for an exact resume: torch's default generator, CUDA's
    (when CUDA is in use) and every sharded stream of ``model`` (:func:`tp_streams`).

    The result holds only tensors, numbers and None, so it loads with
    ``torch.load(weights_only=True)``. :func:`shardwise.checkpoint.save_checkpoint` saves
    it per rank.

    Example::

        >>> state = get_rng_state(model)
        >>> set_rng_state(model, state)   # the next dropout masks repeat
    """
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if _cuda_rng_in_use() else None,
        "tp": [rng.get_state() for rng in tp_streams(model)],
    }


def set_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore a :func:`get_rng_state` result on this rank.

    Raises ``ValueError`` when ``model`` has a different number of sharded streams than
    the state holds (a different model or plan), before changing anything.

    Example::

        >>> set_rng_state(model, state)
    """
    streams = tp_streams(model)
    if len(streams) != len(state["tp"]):
        raise ValueError(
            f"the RNG state holds {len(state['tp'])} tensor-parallel stream(s), the model "
            f"{len(streams)}"
        )
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for rng, saved in zip(streams, state["tp"]):
        rng.set_state(saved)
