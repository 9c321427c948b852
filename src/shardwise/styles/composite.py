"""PairwiseParallel and SequenceParallel: the seed's composite styles, which are plans.

Neither shards anything itself: :meth:`~ModuleStyle.expand` turns each into the
primitive entries it stands for (Colwise/Rowwise pairs, sharded attention, norms and
dropouts on a sequence shard), which ``parallelize_module`` then checks and applies.

Example::

    >>> expand_plan(mlp, PairwiseParallel(), tp_size=2)
    {'fc1': ColwiseParallel(...), 'fc2': RowwiseParallel(...)}
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._engine.sequence_norm import is_norm
from ..layouts import (
    make_input_replicate_1d,
    make_input_reshard_replicate,
    make_input_shard_1d_last_dim,
    make_output_reshard_tensor,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .base import ModuleStyle, ParallelStyle, PlanContext, PrepareFn, join_fqn
from .linear import ColwiseParallel, RowwiseParallel
from .mlp_pairs import dropouts_inside_pairs, is_mlp, is_transformer_layer, mlp_pairs
from .primitives import (
    ATTENTION_TYPES,
    DROPOUT_TYPES,
    SequenceShardedLayer,
    ShardedAttention,
    ShardedDropout,
    ShardedNorm,
)

__all__ = ["FunctionStyle", "PairwiseParallel", "SequenceParallel", "as_module_style"]

class PairwiseParallel(ModuleStyle):
    """Colwise then Rowwise as a fixed pair, as in Megatron-LM (arXiv:1909.08053).

    Applies to an MLP with an even number of direct ``nn.Linear`` children (pairs in
    registration order), to ``nn.MultiheadAttention`` (swapped for
    :class:`~shardwise.multihead_attention_tp.TensorParallelMultiheadAttention`, heads
    split across ranks) and to ``nn.Transformer`` and its encoder/decoder layers (their
    feed-forward pairs). It is a plan, not a mechanism: :meth:`expand` turns it into
    ``ColwiseParallel``/``RowwiseParallel``/``ShardedAttention`` entries.

    * Input: replicated. ``None`` means :func:`make_input_replicate_1d`, and is stored as it.
    * Output: replicated plain tensor. ``None`` means :func:`make_output_tensor`, stored as it.
    * Forward: one all-reduce per pair. Backward: one all-reduce per pair.

    Example::

        >>> model = parallelize_module(model, mesh, PairwiseParallel())
        >>> expand_plan(mlp, PairwiseParallel(), tp_size=2)
        {'fc1': ColwiseParallel(...), 'fc2': RowwiseParallel(...)}
    """

    save_gathered_input = False  # SequenceParallel's option; pairs without SP gather nothing

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        # The seed stores its defaults in place of ``None`` (the seed's contract, section 2).
        super().__init__(
            make_input_replicate_1d if _prepare_input is None else _prepare_input,
            make_output_tensor if _prepare_output is None else _prepare_output,
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
                self._column(self.input_fn()).io(),
                RowwiseParallel(make_input_shard_1d_last_dim, self.output_fn()).io(),
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
        for i, (column, row) in enumerate(pairs):
            fn_in = first_in if i == 0 else make_input_replicate_1d
            fn_out = last_out if i == len(pairs) - 1 else make_output_tensor
            entries[join_fqn(fqn, column)] = self._column(fn_in)
            entries[join_fqn(fqn, row)] = RowwiseParallel(make_input_shard_1d_last_dim, fn_out)
        if layer_io:
            entries[fqn] = SequenceShardedLayer()
        return entries

    def _column(self, fn_in: PrepareFn) -> ColwiseParallel:
        return ColwiseParallel(
            fn_in, make_sharded_output_tensor, save_gathered_input=self.save_gathered_input
        )

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

    On ``nn.LayerNorm``/``nn.RMSNorm`` it expands to :class:`~shardwise.styles.primitives.ShardedNorm`
    and on dropout to :class:`~shardwise.styles.primitives.ShardedDropout`: they run on the
    local sequence shard.

    The result equals the single-device module applied to the concatenation of all
    ranks' inputs; parameter gradients are those of the sum of all ranks' losses.

    Keyword Args:
        save_gathered_input: column layers save their all-gathered input for backward
            instead of the sequence shard (see :class:`ColwiseParallel`).

    Example::

        >>> mlp = parallelize_module(mlp, mesh, SequenceParallel())
        >>> y_mine = mlp(x_mine)   # x_mine: [S/W, B, H]
    """

    def __init__(self, *, save_gathered_input: bool = False) -> None:
        super().__init__(make_input_reshard_replicate, make_output_reshard_tensor)
        if not isinstance(save_gathered_input, bool):
            raise TypeError(
                f"SequenceParallel(save_gathered_input=...) must be a bool, got "
                f"{save_gathered_input!r}"
            )
        self.save_gathered_input = save_gathered_input

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + ", save_gathered_input=True)" if self.save_gathered_input else text

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
