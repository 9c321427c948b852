"""ColwiseParallel and RowwiseParallel: the two primitive styles on ``nn.Linear`` and ``nn.Embedding``.

Each is a small value object holding its input/output layouts (:class:`ModuleIO`);
:meth:`~ModuleStyle.apply` hands them to the engine's column or row forward.

Example::

    >>> parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard

from .._engine.io import ModuleIO, as_placement
from .._engine.sharded_embedding import (
    ColumnEmbeddingForward,
    RowEmbeddingForward,
    ShardedEmbeddingForward,
)
from .._engine.sharded_linear import ColumnLinearForward, RowLinearForward, ShardedLinearForward
from ..layouts import (
    io_from_functions,
    make_input_replicate_1d,
    make_input_shard_1d_last_dim,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .base import ModuleStyle, PrepareFn

__all__ = ["ColwiseParallel", "RowwiseParallel"]


class _LinearLikeStyle(ModuleStyle):
    """Shared machinery of ColwiseParallel and RowwiseParallel (``nn.Linear``, ``nn.Embedding``)."""

    linear_forward: ClassVar[type[ShardedLinearForward]]
    embedding_forward: ClassVar[type[ShardedEmbeddingForward]]
    default_layouts: ClassVar[tuple[Placement, Placement]]  # (input, output) of the keywords

    def __init__(
        self,
        _prepare_input: PrepareFn | None,
        _prepare_output: PrepareFn | None,
        defaults: tuple[PrepareFn, PrepareFn],
        input_layouts: Placement | tuple[Placement] | None,
        output_layouts: Placement | tuple[Placement] | None,
        use_local_output: bool,
        save_gathered_input: bool = False,
    ) -> None:
        name = type(self).__name__
        in_layout = as_placement(input_layouts, f"{name}(input_layouts=...)")
        out_layout = as_placement(output_layouts, f"{name}(output_layouts=...)")
        if not isinstance(use_local_output, bool):
            raise TypeError(
                f"{name}(use_local_output=...) must be a bool, got {use_local_output!r}"
            )
        if not isinstance(save_gathered_input, bool):
            raise TypeError(
                f"{name}(save_gathered_input=...) must be a bool, got {save_gathered_input!r}"
            )
        self._from_layouts = in_layout is not None or out_layout is not None or not use_local_output
        if self._from_layouts:
            if (_prepare_input, _prepare_output) != defaults:
                raise ValueError(
                    f"{name}: pass either the seed's _prepare_input/_prepare_output functions "
                    "or input_layouts/output_layouts/use_local_output, not both."
                )
            _prepare_input = _prepare_output = None  # unused: the layouts say it all
            default_in, default_out = self.default_layouts
            io = ModuleIO(in_layout or default_in, out_layout or default_out, use_local_output)
        else:
            # The seed's functions, translated to placements once, here (a user's own
            # function stays a function and runs on DTensors).
            natural = self.linear_forward.natural_output
            io = io_from_functions(natural, _prepare_input, _prepare_output)
        self._io = dataclasses.replace(io, save_gathered_input=save_gathered_input)
        super().__init__(_prepare_input, _prepare_output)

    def io(self) -> ModuleIO:
        """The input/output handling this style asks for, in placements.

        Example::

            >>> ColwiseParallel(input_layouts=Shard(1)).io().input_layout
            Shard(dim=1)
        """
        return self._io

    @property
    def input_layouts(self) -> tuple[Placement] | None:
        """``(placement,)`` of a plain input, as in torch 2.x (``None``: used as given)."""
        io = self.io()
        return None if io.input_fn is not None or io.input_layout is None else (io.input_layout,)

    @property
    def output_layouts(self) -> tuple[Placement]:
        """``(placement,)`` the output is redistributed to, as in torch 2.x."""
        return (self.io().output_layout,)

    @property
    def use_local_output(self) -> bool:
        """Whether the caller gets the local tensor (``True``) or the DTensor."""
        return self.io().use_local_output

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) unless ``module`` is an unsharded Linear/Embedding that fits."""
        if isinstance(module, nn.Embedding):
            self.embedding_forward.check(module, fqn, mesh.size())
        elif isinstance(module, nn.Linear):
            self.linear_forward.check(module, fqn, mesh.size())
        else:
            raise RuntimeError(
                f"Expect a torch.nn.Linear or torch.nn.Embedding module but received "
                f"{type(module)}! ({type(self).__name__} on '{fqn or type(module).__name__}')"
            )

    def param_placements(self, module: Any) -> Mapping[str, Placement] | None:
        """``weight``/``bias`` placements on a Linear or Embedding (see :class:`ModuleStyle`)."""
        if isinstance(module, nn.Embedding):
            return dict(self.embedding_forward.placements)
        if isinstance(module, nn.Linear):
            return dict(self.linear_forward.placements)
        return None

    def apply(self, module: Any, mesh: Any) -> Any:
        """Shard ``module``'s parameters on ``mesh`` and install its local forward."""
        if isinstance(module, nn.Embedding):
            return self.embedding_forward.parallelize(module, mesh, self.io())
        return self.linear_forward.parallelize(module, mesh, self.io())

    def __repr__(self) -> str:
        extra = ", save_gathered_input=True" if self._io.save_gathered_input else ""
        if not self._from_layouts:
            return super().__repr__()[:-1] + extra + ")"
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts}, "
            f"output_layouts={self.output_layouts}, use_local_output={self.use_local_output}"
            f"{extra})"
        )


class RowwiseParallel(_LinearLikeStyle):
    """Shard an ``nn.Linear`` by rows of the math, or an ``nn.Embedding`` by vocabulary.

    ``nn.Linear``: ``weight`` ``Shard(1)`` (``in_features`` split), ``bias`` ``Replicate``.

    * Input: this rank's slice of the last (feature) dimension (``Shard(-1)``).
    * Output: the full result, identical on every rank, as a plain tensor (``Replicate``).
    * Forward: one all-reduce of the partial products (Megatron's *g*); bias added once.
    * Backward: no collective; the input gradient is this rank's feature slice.

    ``nn.Embedding``: ``weight`` ``Shard(0)`` (vocabulary split). Input: token ids,
    redistributed to ``Replicate`` (torch's default ``input_layouts`` is ``Shard(-1)``,
    which all-gathers ids along their last dim: pass ``input_layouts=Replicate()`` when
    every rank holds all ids). Each rank looks up its vocabulary slice, zeros elsewhere.
    Forward: one all-reduce. Backward: no collective.

    Keyword Args:
        input_layouts: layout of a plain input tensor (default ``Shard(-1)``).
        output_layouts: layout of the output: ``Replicate()`` (all-reduce), ``Shard(d)``
            (reduce-scatter on ``d``; backward all-gathers) or ``Partial()`` (none).
        use_local_output: return the local tensor (default) or the DTensor.

    The seed's positional ``_prepare_input``/``_prepare_output`` functions are still
    accepted (not together with the keywords). ``in_features`` (``num_embeddings``) that
    the mesh size does not divide is split like ``torch.chunk``.

    Example::

        >>> parallelize_module(model, mesh, {"fc2": RowwiseParallel()})
        >>> parallelize_module(model, mesh, {"tok": RowwiseParallel(input_layouts=Replicate(),
        ...                                                         output_layouts=Shard(1))})
    """

    linear_forward = RowLinearForward
    embedding_forward = RowEmbeddingForward
    default_layouts = (Shard(-1), Replicate())

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_shard_1d_last_dim,
        _prepare_output: PrepareFn | None = make_output_tensor,
        *,
        input_layouts: Placement | tuple[Placement] | None = None,
        output_layouts: Placement | tuple[Placement] | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__(
            _prepare_input, _prepare_output, (make_input_shard_1d_last_dim, make_output_tensor),
            input_layouts, output_layouts, use_local_output,
        )


class ColwiseParallel(_LinearLikeStyle):
    """Shard an ``nn.Linear`` by output features, or an ``nn.Embedding`` by embedding dim.

    ``nn.Linear``: ``weight`` and ``bias`` ``Shard(0)`` (``out_features`` split).
    ``nn.Embedding``: ``weight`` ``Shard(1)``.

    * Input: replicated (every rank passes the same full tensor; ``Replicate``).
    * Output: this rank's slice of the last (feature) dimension, as a plain tensor (``Shard(-1)``).
    * Forward: no collective.
    * Backward: one all-reduce of the input gradient (Megatron's *f*); none for an Embedding.

    Keyword Args:
        input_layouts: layout of a plain input: ``Replicate()`` (default) or ``Shard(d)``,
            a sequence shard that is all-gathered on ``d`` (backward: reduce-scatter).
            Projections reading the same activation share one entry collective.
        output_layouts: ``Shard(-1)`` (default, no collective) or ``Replicate()``
            (all-gather of the last dim; backward: split).
        use_local_output: return the local tensor (default) or the DTensor.
        save_gathered_input: with a sequence-shard input, save the all-gathered input for
            backward (no extra collective; (t-1)/t of it more memory per rank) instead of
            the shard, which backward all-gathers again (Megatron-LM's scheme, the
            default). Prefer it only for latency-bound steps with small activations.

    The seed's positional ``_prepare_input``/``_prepare_output`` functions are still
    accepted (not together with the layout keywords). ``out_features`` (``embedding_dim``)
    that the mesh size does not divide is split like ``torch.chunk``.

    Example::

        >>> parallelize_module(model, mesh, {"fc1": ColwiseParallel()})
        >>> parallelize_module(model, mesh, {"q": ColwiseParallel(input_layouts=Shard(1))})
    """

    linear_forward = ColumnLinearForward
    embedding_forward = ColumnEmbeddingForward
    default_layouts = (Replicate(), Shard(-1))

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_replicate_1d,
        _prepare_output: PrepareFn | None = make_sharded_output_tensor,
        *,
        input_layouts: Placement | tuple[Placement] | None = None,
        output_layouts: Placement | tuple[Placement] | None = None,
        use_local_output: bool = True,
        save_gathered_input: bool = False,
    ) -> None:
        super().__init__(
            _prepare_input, _prepare_output, (make_input_replicate_1d, make_sharded_output_tensor),
            input_layouts, output_layouts, use_local_output, save_gathered_input,
        )
