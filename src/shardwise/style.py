"""Parallel styles: how a module's parameters are sharded and how its input and output
are laid out.

Each style is a small value object; :func:`shardwise.parallelize_module` reads it and
does the work. The tables below state each style's contract on a TP mesh of size W.

===================  ======================  ======================  ==========================  ==========================
style                input (default)         output (default)        forward collective          backward collective
===================  ======================  ======================  ==========================  ==========================
ColwiseParallel      replicated              last-dim shard, local   none                        all-reduce of input grad
RowwiseParallel      last-dim shard, local   replicated, local       all-reduce                  none
PairwiseParallel     replicated              replicated, local       one all-reduce per pair     one all-reduce per pair
SequenceParallel     dim-0 shard, local      dim-0 shard, local      all-gather in, r-scatter    reduce-scatter in,
                                                                     out                         all-gather out
===================  ======================  ======================  ==========================  ==========================

ColwiseParallel and RowwiseParallel also take torch 2.x's keyword-only
``input_layouts``, ``output_layouts`` and ``use_local_output`` (and apply to
``nn.Embedding``); :mod:`shardwise.prepare` has ``PrepareModuleInput``/``Output``.

Example::

    >>> parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard

from ._engine.sequence_norm import is_norm
from ._engine.sharded_embedding import check_embedding, embedding_placements, parallelize_embedding
from ._engine.sharded_linear import check_linear, linear_placements, parallelize_linear
from .layouts import (
    ModuleIO,
    Role,
    as_placement,
    io_from_functions,
    make_input_replicate_1d,
    make_input_reshard_replicate,
    make_input_shard_1d,
    make_input_shard_1d_last_dim,
    make_output_replicate_1d,
    make_output_reshard_tensor,
    make_output_shard_1d,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .pairwise import dropouts_inside_pairs, is_mlp, is_transformer_layer, mlp_pairs
from .primitives import (
    ATTENTION_TYPES,
    DROPOUT_TYPES,
    SequenceShardedLayer,
    ShardedAttention,
    ShardedDropout,
    ShardedNorm,
)
from .style_base import ModuleStyle, ParallelStyle, PlanContext, PrepareFn, join_fqn

__all__ = [
    "ColwiseParallel",
    "ModuleStyle",
    "PairwiseParallel",
    "ParallelStyle",
    "RowwiseParallel",
    "SequenceParallel",
    "make_input_replicate_1d",
    "make_input_reshard_replicate",
    "make_input_shard_1d",
    "make_input_shard_1d_last_dim",
    "make_output_replicate_1d",
    "make_output_reshard_tensor",
    "make_output_shard_1d",
    "make_output_tensor",
    "make_sharded_output_tensor",
]

class _LinearLikeStyle(ModuleStyle):
    """Shared machinery of ColwiseParallel and RowwiseParallel (``nn.Linear``, ``nn.Embedding``)."""

    role: ClassVar[Role]

    def __init__(
        self,
        _prepare_input: PrepareFn | None,
        _prepare_output: PrepareFn | None,
        defaults: tuple[PrepareFn, PrepareFn],
        input_layouts: Placement | tuple[Placement] | None,
        output_layouts: Placement | tuple[Placement] | None,
        use_local_output: bool,
    ) -> None:
        name = type(self).__name__
        in_layout = as_placement(input_layouts, f"{name}(input_layouts=...)")
        out_layout = as_placement(output_layouts, f"{name}(output_layouts=...)")
        if not isinstance(use_local_output, bool):
            raise TypeError(
                f"{name}(use_local_output=...) must be a bool, got {use_local_output!r}"
            )
        self._from_layouts = in_layout is not None or out_layout is not None or not use_local_output
        if self._from_layouts:
            if (_prepare_input, _prepare_output) != defaults:
                raise ValueError(
                    f"{name}: pass either the seed's _prepare_input/_prepare_output functions "
                    "or input_layouts/output_layouts/use_local_output, not both."
                )
            _prepare_input = _prepare_output = None  # unused: the layouts say it all
            default_in, default_out = (
                (Replicate(), Shard(-1)) if self.role == "colwise" else (Shard(-1), Replicate())
            )
            self._io = ModuleIO(in_layout or default_in, out_layout or default_out, use_local_output)
        else:
            # The seed's functions, translated to placements once, here (a user's own
            # function stays a function and runs on DTensors).
            self._io = io_from_functions(self.role, _prepare_input, _prepare_output)
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
            check_embedding(module, fqn, self.role, mesh.size())
        elif isinstance(module, nn.Linear):
            check_linear(module, fqn, self.role, mesh.size())
        else:
            raise RuntimeError(
                f"Expect a torch.nn.Linear or torch.nn.Embedding module but received "
                f"{type(module)}! ({type(self).__name__} on '{fqn or type(module).__name__}')"
            )

    def param_placements(self, module: Any) -> Mapping[str, Placement] | None:
        """``weight``/``bias`` placements on a Linear or Embedding (see :class:`ModuleStyle`)."""
        if isinstance(module, nn.Embedding):
            return embedding_placements(self.role)
        if isinstance(module, nn.Linear):
            return linear_placements(self.role)
        return None

    def apply(self, module: Any, mesh: Any) -> Any:
        """Shard ``module``'s parameters on ``mesh`` and install its local forward."""
        if isinstance(module, nn.Embedding):
            return parallelize_embedding(module, mesh, self.role, self.io())
        return parallelize_linear(module, mesh, self.role, self.io())

    def __repr__(self) -> str:
        if not self._from_layouts:
            return super().__repr__()
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts}, "
            f"output_layouts={self.output_layouts}, use_local_output={self.use_local_output})"
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

    role: ClassVar[Role] = "rowwise"

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

    The seed's positional ``_prepare_input``/``_prepare_output`` functions are still
    accepted (not together with the keywords). ``out_features`` (``embedding_dim``) that
    the mesh size does not divide is split like ``torch.chunk``.

    Example::

        >>> parallelize_module(model, mesh, {"fc1": ColwiseParallel()})
        >>> parallelize_module(model, mesh, {"q": ColwiseParallel(input_layouts=Shard(1))})
    """

    role: ClassVar[Role] = "colwise"

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_replicate_1d,
        _prepare_output: PrepareFn | None = make_sharded_output_tensor,
        *,
        input_layouts: Placement | tuple[Placement] | None = None,
        output_layouts: Placement | tuple[Placement] | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__(
            _prepare_input, _prepare_output, (make_input_replicate_1d, make_sharded_output_tensor),
            input_layouts, output_layouts, use_local_output,
        )


class PairwiseParallel(ModuleStyle):
    """Colwise then Rowwise as a fixed pair, as in Megatron-LM (arXiv:1909.08053).

    Applies to an MLP with an even number of direct ``nn.Linear`` children (pairs in
    registration order), to ``nn.MultiheadAttention`` (swapped for
    :class:`~shardwise.multihead_attention_tp.TensorParallelMultiheadAttention`, heads
    split across ranks) and to ``nn.Transformer`` and its encoder/decoder layers (their
    feed-forward pairs). It is a plan, not a mechanism: :meth:`expand` turns it into
    ``ColwiseParallel``/``RowwiseParallel``/``ShardedAttention`` entries.

    * Input: replicated. ``None`` means :func:`make_input_replicate_1d` (stored as such).
    * Output: replicated plain tensor. ``None`` means :func:`make_output_tensor`.
    * Forward: one all-reduce per pair. Backward: one all-reduce per pair.

    Example::

        >>> model = parallelize_module(model, mesh, PairwiseParallel())
        >>> expand_plan(mlp, PairwiseParallel(), tp_size=2)
        {'fc1': ColwiseParallel(...), 'fc2': RowwiseParallel(...)}
    """

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        super().__init__(
            _prepare_input or make_input_replicate_1d, _prepare_output or make_output_tensor
        )

    def input_fn(self) -> PrepareFn:
        """The input function this style applies.

        Example::

            >>> PairwiseParallel().input_fn() is make_input_replicate_1d
            True
        """
        assert self._prepare_input is not None
        return self._prepare_input

    def output_fn(self) -> PrepareFn:
        """The output function this style applies.

        Example::

            >>> PairwiseParallel().output_fn() is make_output_tensor
            True
        """
        assert self._prepare_output is not None
        return self._prepare_output

    def expand(self, module: nn.Module, fqn: str, ctx: PlanContext) -> dict[str, ModuleStyle]:
        """Attention, MLP pairs, or (recursively) whatever of those ``module`` contains."""
        if isinstance(module, ATTENTION_TYPES):
            return {fqn: ShardedAttention(
                io_from_functions("colwise", self.input_fn(), make_sharded_output_tensor),
                io_from_functions("rowwise", make_input_shard_1d_last_dim, self.output_fn()),
                ctx.rng,
            )}
        if is_mlp(module):
            return self._expand_mlp(module, fqn, ctx)
        entries: dict[str, ModuleStyle] = {}
        for name, child in module.named_children():
            entries.update(self.expand(child, join_fqn(fqn, name), ctx))
        return entries

    def _expand_mlp(self, module: nn.Module, fqn: str, ctx: PlanContext) -> dict[str, ModuleStyle]:
        # A sequence-parallel Transformer layer gathers and scatters around the whole
        # layer (SequenceShardedLayer), so its Linears see replicated activations.
        layer_io = isinstance(self, SequenceParallel) and is_transformer_layer(module)
        first_in = make_input_replicate_1d if layer_io else self.input_fn()
        last_out = make_output_tensor if layer_io else self.output_fn()
        entries: dict[str, ModuleStyle] = {
            join_fqn(fqn, name): ShardedDropout(ctx.rng) for name, _ in dropouts_inside_pairs(module)
        }
        pairs = mlp_pairs(module, fqn, type(self).__name__)
        for i, (name, _, role) in enumerate(pairs):
            if role == "colwise":
                fn_in = first_in if i == 0 else make_input_replicate_1d
                entries[join_fqn(fqn, name)] = ColwiseParallel(fn_in, make_sharded_output_tensor)
            else:
                fn_out = last_out if i == len(pairs) - 1 else make_output_tensor
                entries[join_fqn(fqn, name)] = RowwiseParallel(make_input_shard_1d_last_dim, fn_out)
        if layer_io:
            entries[fqn] = SequenceShardedLayer()
        return entries

    def apply(self, module: Any, mesh: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} is a plan, not a mechanism: parallelize_module applies "
            "the entries it expands into (see shardwise.expand_plan)."
        )


class SequenceParallel(PairwiseParallel):
    """PairwiseParallel with sequence-sharded input and output (arXiv:2205.05198).

    Every rank passes its own dim-0 slice (Megatron's ``[seq, batch, hidden]`` layout).

    * Input: this rank's dim-0 slice; all-gathered on entry.
    * Output: this rank's dim-0 slice of the result.
    * Forward: all-gather in, reduce-scatter out. Backward: reduce-scatter in, all-gather out.

    On ``nn.LayerNorm``/``nn.RMSNorm`` it expands to :class:`~shardwise.primitives.ShardedNorm`
    and on dropout to :class:`~shardwise.primitives.ShardedDropout`: they run on the
    local sequence shard.

    The result equals the single-device module applied to the concatenation of all
    ranks' inputs; parameter gradients are those of the sum of all ranks' losses.

    Example::

        >>> mlp = parallelize_module(mlp, mesh, SequenceParallel())
        >>> y_mine = mlp(x_mine)   # x_mine: [S/W, B, H]
    """

    def __init__(self) -> None:
        super().__init__(make_input_reshard_replicate, make_output_reshard_tensor)

    def expand(self, module: nn.Module, fqn: str, ctx: PlanContext) -> dict[str, ModuleStyle]:
        """Norms and dropouts on the sequence shard; otherwise as PairwiseParallel."""
        if is_norm(module):
            return {fqn: ShardedNorm()}
        if isinstance(module, DROPOUT_TYPES):
            return {fqn: ShardedDropout(ctx.rng)}
        return super().expand(module, fqn, ctx)


class FunctionStyle(PairwiseParallel):
    """A user's plain :class:`ParallelStyle` subclass (the seed's extension), as a plan.

    Like the seed, it parallelizes attention with its own input/output functions and
    refuses MLPs, which need PairwiseParallel.
    """

    def __init__(self, style: ParallelStyle) -> None:
        super().__init__(style._prepare_input, style._prepare_output)
        self.style = style

    def _expand_mlp(self, module: nn.Module, fqn: str, ctx: PlanContext) -> dict[str, ModuleStyle]:
        raise NotImplementedError(
            f"Only support PairwiseParallel for MLP parallelization ('{fqn or type(module).__name__}' "
            f"got {type(self.style).__name__})."
        )

    def __repr__(self) -> str:
        return f"FunctionStyle({self.style!r})"


def as_module_style(style: ParallelStyle) -> ModuleStyle:
    """``style`` itself, or a plain ParallelStyle subclass wrapped as :class:`FunctionStyle`."""
    return style if isinstance(style, ModuleStyle) else FunctionStyle(style)
