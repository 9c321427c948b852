"""Vocabulary- and feature-parallel ``nn.Embedding`` on local shards.

* Row-wise (``RowwiseParallel``): ``weight`` ``Shard(0)``, each rank holds a slice of
  the vocabulary (``torch.chunk`` layout, so 10 tokens on 4 ranks are 3, 3, 3, 1). Each
  rank looks up the ids in its slice and writes zero rows for the others; the partial
  results are summed by one all-reduce (or reduce-scatter onto a sequence dimension).
  Backward needs no collective for an all-reduce output.
* Column-wise (``ColwiseParallel``): ``weight`` ``Shard(1)``, each rank holds a slice of
  the embedding dimension; the lookup is local and the output is last-dim sharded, or
  all-gathered for a ``Replicate`` output.

``padding_idx`` keeps its meaning: that row's gradient stays zero. ``max_norm`` and
``sparse`` (both styles) and ``scale_grad_by_freq`` (row-wise) are rejected. Row-wise,
an id outside ``[0, num_embeddings)`` gives a zero row instead of an error (checking
would cost a device sync per step).

Example::

    >>> parallelize_module(model, mesh, {"tok": RowwiseParallel(input_layouts=Replicate())})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from .collectives import chunk_range
from .forward import ParallelForward, check_installable
from .io import ModuleIO
from .local_params import distribute_parameter, local_param
from .redistribute import input_to_local, output_from_local
from .sharded_linear import check_shardable

__all__ = ["ColumnEmbeddingForward", "RowEmbeddingForward", "ShardedEmbeddingForward"]


class ShardedEmbeddingForward(ParallelForward):
    """The forward installed on a parallelized ``nn.Embedding`` (bound to it as a method)."""

    style: ClassVar[str]  # the style that installs it, for messages
    sharded_feature: ClassVar[str]  # the nn.Embedding attribute split over the group
    placements: ClassVar[Mapping[str, Placement]]  # of ``weight``
    natural_output: ClassVar[Placement]  # the layout of the local lookup, before any move
    unsupported: ClassVar[tuple[str, ...]] = ("max_norm", "sparse")
    base = nn.Embedding

    @classmethod
    def check(cls, module: nn.Module, fqn: str, world: int) -> None:
        """Raise, without communicating, if ``module`` cannot be sharded over ``world`` ranks.

        Example::

            >>> RowEmbeddingForward.check(nn.Embedding(3, 8), "tok", 4)
            Traceback (most recent call last):
            ValueError: tok: RowwiseParallel cannot shard num_embeddings=3 over 4 ranks ...
        """
        name = fqn or type(module).__name__
        if not isinstance(module, nn.Embedding):
            raise RuntimeError(f"Expect a torch.nn.Embedding module but received {type(module)}!")
        check_installable(module, name, nn.Embedding, cls.style)
        for feature in cls.unsupported:
            if getattr(module, feature) not in (None, False):
                label = feature if feature == "max_norm" else f"{feature}=True"
                raise NotImplementedError(
                    f"{name}: {cls.style} on nn.Embedding does not support {label}."
                )
        size = getattr(module, cls.sharded_feature)
        check_shardable(name, cls.style, cls.sharded_feature, size, world)

    @classmethod
    def parallelize(cls, module: nn.Embedding, mesh: DeviceMesh, io: ModuleIO) -> nn.Embedding:
        """Shard ``module``'s weight on the 1-D ``mesh`` and install this forward.

        Call :meth:`check` first: this communicates (it scatters the weight).

        Example::

            >>> RowEmbeddingForward.parallelize(model.tok, mesh, ModuleIO(Replicate(), Replicate()))
        """
        for name, placement in cls.placements.items():
            distribute_parameter(module, name, mesh, placement)
        cls(mesh, io, module).install(module)
        return module

    def __init__(self, mesh: DeviceMesh, io: ModuleIO, module: nn.Embedding) -> None:
        self.mesh = mesh
        self.io = io
        self.group = mesh.get_group()
        self.input_layout = io.input_layout if io.input_fn is None else None
        self.output_layout = io.output_layout if io.output_fn is None else None
        self.dim = module.embedding_dim
        self.padding_idx = module.padding_idx

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.io})"

    def __call__(self, module: nn.Embedding, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"{type(module).__name__}.forward() missing its input tensor")
        ids = input_to_local(args[0], self.io, Replicate(), self.mesh)  # every id, every rank
        w = local_param(module.weight)
        assert w is not None  # an Embedding always has a weight
        return self._lookup(module, ids, w)

    def _lookup(self, module: nn.Embedding, ids: torch.Tensor, w: torch.Tensor) -> Any:
        raise NotImplementedError


class ColumnEmbeddingForward(ShardedEmbeddingForward):
    """Embedding-dim parallel: every id looked up in this rank's slice of the features."""

    style = "ColwiseParallel"
    sharded_feature = "embedding_dim"
    placements = {"weight": Shard(1)}
    natural_output = Shard(-1)

    def _lookup(self, module: nn.Embedding, ids: torch.Tensor, w: torch.Tensor) -> Any:
        y = F.embedding(
            ids, w, self.padding_idx, scale_grad_by_freq=module.scale_grad_by_freq
        )  # [..., D/W] Shard(-1)
        return output_from_local(y, Shard(-1), self.io, self.mesh, size=self.dim)


class RowEmbeddingForward(ShardedEmbeddingForward):
    """Vocabulary parallel: this rank's rows for its ids, zeros elsewhere, then summed."""

    style = "RowwiseParallel"
    sharded_feature = "num_embeddings"
    placements = {"weight": Shard(0)}
    natural_output = Partial()
    unsupported = ("max_norm", "sparse", "scale_grad_by_freq")

    def __init__(self, mesh: DeviceMesh, io: ModuleIO, module: nn.Embedding) -> None:
        super().__init__(mesh, io, module)
        world, rank = mesh.size(), mesh.get_local_rank()
        self.start, self.rows = chunk_range(module.num_embeddings, world, rank)
        pad = module.padding_idx
        if pad is not None:
            pad = pad - self.start if self.start <= pad < self.start + self.rows else None
        self.padding_idx = pad  # in local row numbers; None where this rank lacks the row

    def _lookup(self, module: nn.Embedding, ids: torch.Tensor, w: torch.Tensor) -> Any:
        return output_from_local(self._vocab_lookup(ids, w), Partial(), self.io, self.mesh)

    def _vocab_lookup(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """This rank's share of the lookup: its rows for its ids, zeros elsewhere (Partial)."""
        if self.rows == 0:
            # An empty vocabulary slice: a one-hot matmul over zero classes, so the (empty)
            # weight still gets its gradient and every rank's optimizer sees the same params.
            return torch.matmul(w.new_zeros((*ids.shape, 0)), w)  # [..., D] zeros
        if self.mesh.size() == 1:
            return F.embedding(ids, w, self.padding_idx)
        outside = (ids < self.start) | (ids >= self.start + self.rows)
        local_ids = (ids - self.start).masked_fill(outside, 0)
        y = F.embedding(local_ids, w, self.padding_idx)  # [..., D]
        # Zeroing the borrowed rows also zeroes their gradient: row 0 only learns its own ids.
        return y.masked_fill(outside.unsqueeze(-1), 0.0)
