"""Primitive styles that composite styles expand into, besides Colwise and Rowwise.

``PairwiseParallel`` and ``SequenceParallel`` are plans, not mechanisms: on a module they
expand into one primitive entry per submodule they change. Next to ``ColwiseParallel``
and ``RowwiseParallel`` (:mod:`shardwise.style`) those are:

==========================  ==========================================================
``ShardedNorm()``           LayerNorm/RMSNorm on the local sequence shard; weight
                            gradients summed over the TP group.
``ShardedDropout(rng)``     a dropout whose masks come from the per-rank sharded stream.
``ShardedAttention(i, o)``  ``nn.MultiheadAttention`` swapped for
                            :class:`~shardwise.multihead_attention_tp.TensorParallelMultiheadAttention`,
                            heads split; ``i``/``o`` are its input and output layouts.
``SequenceShardedLayer()``  an ``nn.Transformer*Layer`` that takes and returns dim-0
                            shards (its Linears are planned by their own entries).
==========================  ==========================================================

Example::

    >>> expand_plan(nn.TransformerEncoderLayer(8, 2), SequenceParallel(), tp_size=2)
    {'self_attn': ShardedAttention(...), 'linear1': ColwiseParallel(...), ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn
from torch.distributed.tensor import Placement, Replicate

from .._engine.io import ModuleIO
from .._engine.sequence_norm import check_norm, is_norm, shard_norm
from .._engine.torch_compat import DropoutBase
from ..multihead_attention_tp import (
    TensorParallelMultiheadAttention,
    check_attention,
    parallelize_attention,
)
from ..random import shard_dropout
from .base import ModuleStyle, SharedRNG
from .mlp_pairs import shard_sequence_io

__all__ = [
    "ATTENTION_TYPES",
    "DROPOUT_TYPES",
    "SequenceShardedLayer",
    "ShardedAttention",
    "ShardedDropout",
    "ShardedNorm",
]

ATTENTION_TYPES = (nn.MultiheadAttention, TensorParallelMultiheadAttention)
# Every dropout module torch has (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (DropoutBase,)


class ShardedNorm(ModuleStyle):
    """A LayerNorm/RMSNorm run on this rank's sequence shard (replicated weights)."""

    def __init__(self) -> None:
        super().__init__()

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        if not is_norm(module):
            raise RuntimeError(
                f"ShardedNorm on '{fqn or type(module).__name__}' expects nn.LayerNorm or "
                f"nn.RMSNorm, got {type(module).__name__}"
            )
        check_norm(module, fqn)

    def param_placements(self, module: Any) -> Mapping[str, Placement]:
        return {"weight": Replicate(), "bias": Replicate()}

    def apply(self, module: Any, mesh: Any) -> Any:
        return shard_norm(module, mesh)

    def __repr__(self) -> str:
        return "ShardedNorm()"


class ShardedDropout(ModuleStyle):
    """A dropout that draws each rank's mask from the plan's sharded stream."""

    def __init__(self, rng: SharedRNG | None = None) -> None:
        super().__init__()
        self.rng = rng or SharedRNG()

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        if not isinstance(module, DROPOUT_TYPES):
            raise RuntimeError(
                f"ShardedDropout on '{fqn or type(module).__name__}' expects a dropout module, "
                f"got {type(module).__name__}"
            )

    def apply(self, module: Any, mesh: Any) -> Any:
        return shard_dropout(module, self.rng.get(mesh))

    def __repr__(self) -> str:
        return "ShardedDropout()"


class ShardedAttention(ModuleStyle):
    """Head-parallel attention: column-parallel in-projections, row-parallel ``proj``.

    Args:
        input_io: how the in-projections take their input (e.g. replicated, or dim-0
            shards all-gathered on entry).
        output_io: how ``proj`` returns its result (all-reduce, or reduce-scatter on dim 0).
        rng: the plan's sharded stream, for the per-head attention dropout.
    """

    def __init__(self, input_io: ModuleIO, output_io: ModuleIO, rng: SharedRNG | None = None) -> None:
        super().__init__()
        self.input_io, self.output_io = input_io, output_io
        self.rng = rng or SharedRNG()

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        check_attention(module, fqn, mesh.size())

    def apply(self, module: Any, mesh: Any) -> Any:
        attention = parallelize_attention(module, mesh, self.input_io, self.output_io)
        attention.sharded_rng = self.rng.get(mesh)
        return attention

    def __repr__(self) -> str:
        return f"ShardedAttention(input={self.input_io.input_layout}, output={self.output_io.output_layout})"


class SequenceShardedLayer(ModuleStyle):
    """An ``nn.Transformer*Layer`` that all-gathers dim 0 of its inputs and returns its dim-0 shard.

    Not exclusive: the layer's own Linears, attention and dropouts have entries of
    their own; this one only wraps the layer's forward.
    """

    exclusive: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            raise RuntimeError(
                f"SequenceShardedLayer on '{fqn or type(module).__name__}' expects an "
                f"nn.TransformerEncoderLayer or nn.TransformerDecoderLayer, got {type(module).__name__}"
            )

    def apply(self, module: Any, mesh: Any) -> Any:
        shard_sequence_io(module, mesh)
        return module

    def __repr__(self) -> str:
        return "SequenceShardedLayer()"
