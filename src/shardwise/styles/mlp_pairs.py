"""How PairwiseParallel and SequenceParallel read MLPs and Transformer layers.

An MLP is a module with two or more direct ``nn.Linear`` children; they are paired in
registration order, even ones column-parallel and odd ones row-parallel. Only the first
Linear sees the style's input layout and only the last its output layout; between
pairs the activation is all-reduced (Megatron's f/g), and inside a pair it stays a
local feature shard, so ReLU/GELU/Dropout in between run on plain local tensors.
The styles themselves (:mod:`shardwise.style`) turn these facts into plan entries.

Example::

    >>> mlp_pairs(mlp, "mlp", "PairwiseParallel")
    [('fc1', 'fc2')]
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .._engine import collectives as C
from .._engine.torch_compat import DropoutBase

__all__ = [
    "dropouts_inside_pairs",
    "is_mlp",
    "is_transformer_layer",
    "linear_children",
    "mlp_pairs",
    "shard_sequence_io",
]

TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def linear_children(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Direct ``nn.Linear`` children in registration order (not call order).

    Example::

        >>> [n for n, _ in linear_children(nn.TransformerEncoderLayer(8, 2))]
        ['linear1', 'linear2']
    """
    return [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]


def is_mlp(module: nn.Module) -> bool:
    """Whether the pairwise MLP rule applies: two or more direct Linear children.

    Example::

        >>> is_mlp(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
        True
    """
    return len(linear_children(module)) >= 2


def dropouts_inside_pairs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Dropout children registered between a pair's column and row Linear.

    Those act on the sharded hidden units, so each rank must draw its own mask. In
    ``nn.TransformerEncoderLayer`` that is ``dropout`` (between ``linear1`` and
    ``linear2``), while ``dropout1``/``dropout2`` act on replicated activations.

    Example::

        >>> [n for n, _ in dropouts_inside_pairs(nn.TransformerEncoderLayer(8, 2))]
        ['dropout']
    """
    found: list[tuple[str, nn.Module]] = []
    linears_seen = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            linears_seen += 1
        elif linears_seen % 2 == 1 and isinstance(child, DropoutBase):
            found.append((name, child))
    return found


def is_transformer_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.TransformerEncoderLayer`` or ``nn.TransformerDecoderLayer``.

    Example::

        >>> is_transformer_layer(nn.TransformerEncoderLayer(8, 2))
        True
    """
    return isinstance(module, TRANSFORMER_LAYERS)


def mlp_pairs(module: nn.Module, fqn: str, style_name: str) -> list[tuple[str, str]]:
    """The direct Linear children of an MLP as (column, row) pairs, in registration order.

    Raises before any collective on an odd Linear count, naming the module.

    Example::

        >>> mlp_pairs(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 4)), "m",
        ...           "PairwiseParallel")
        Traceback (most recent call last):
        RuntimeError: m: PairwiseParallel needs an even number of nn.Linear children ...
    """
    linears = linear_children(module)
    if len(linears) % 2:
        raise RuntimeError(
            f"{fqn or type(module).__name__}: {style_name} needs an even number of nn.Linear "
            f"children to pair column- and row-wise, but found an odd number ({len(linears)}: "
            f"{', '.join(n for n, _ in linears)}). Use a dict plan for the odd one out."
        )
    names = [name for name, _ in linears]
    return list(zip(names[0::2], names[1::2]))


class _SequenceShardedForward:
    """Wraps a Transformer layer: gather dim 0 of its tensor inputs, keep this rank's dim-0 slice of its output."""

    def __init__(self, inner: Any, mesh: DeviceMesh, n_inputs: int) -> None:
        self.inner = inner
        self.group = mesh.get_group()
        self.n_inputs = n_inputs

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        gathered = [
            C.gather_from_region(a, self.group, 0)
            if i < self.n_inputs and isinstance(a, torch.Tensor)
            else a
            for i, a in enumerate(args)
        ]
        out = self.inner(module, *gathered, **kwargs)
        return C.scatter_to_region(out, self.group, 0)


def shard_sequence_io(layer: nn.Module, mesh: DeviceMesh) -> None:
    """Make a Transformer layer take and return dim-0 (sequence) shards on ``mesh``.

    Inside, the layer computes on the gathered sequence (its feed-forward pair is
    tensor-parallel), so its result equals the single-device layer on the concatenation.

    Example::

        >>> shard_sequence_io(encoder_layer, mesh)   # in: [S/W, B, E], out: [S/W, B, E]
    """
    n_inputs = 2 if isinstance(layer, nn.TransformerDecoderLayer) else 1
    wrapped = _SequenceShardedForward(type(layer).forward, mesh, n_inputs)
    layer.forward = types.MethodType(wrapped, layer)
