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

Example::

    >>> parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from .layouts import (
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

__all__ = [
    "ParallelStyle",
    "RowwiseParallel",
    "ColwiseParallel",
    "PairwiseParallel",
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

PrepareFn = Callable[..., Any]


class ParallelStyle(ABC):
    """Base class of all styles: a pair of input/output preparation functions.

    ``_prepare_input(input, device_mesh)`` returns a DTensor in the layout the module
    expects; ``_prepare_output(output, device_mesh)`` turns the module's DTensor result
    into what the caller receives. Subclass it and call ``super().__init__(f, g)``.

    Example::

        >>> class MyStyle(PairwiseParallel): ...
    """

    _prepare_input: PrepareFn | None
    _prepare_output: PrepareFn | None

    @abstractmethod
    def __init__(
        self, _prepare_input: PrepareFn | None, _prepare_output: PrepareFn | None
    ) -> None:
        self._prepare_input = _prepare_input
        self._prepare_output = _prepare_output

    def __repr__(self) -> str:
        def name(fn: PrepareFn | None) -> str:
            return "None" if fn is None else getattr(fn, "__name__", repr(fn))

        return (
            f"{type(self).__name__}(_prepare_input={name(self._prepare_input)}, "
            f"_prepare_output={name(self._prepare_output)})"
        )


class RowwiseParallel(ParallelStyle):
    """Shard an ``nn.Linear`` by rows of the math (``weight`` ``Shard(1)``, ``bias`` ``Replicate``).

    * Input: this rank's slice of the last (feature) dimension.
    * Output: the full result, identical on every rank, as a plain tensor.
    * Forward: one all-reduce of the partial products (Megatron's *g*); bias added once.
    * Backward: no collective; the input gradient is this rank's feature slice.

    Example::

        >>> parallelize_module(model, mesh, {"fc2": RowwiseParallel()})
    """

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_shard_1d_last_dim,
        _prepare_output: PrepareFn | None = make_output_tensor,
    ) -> None:
        super().__init__(_prepare_input, _prepare_output)


class ColwiseParallel(ParallelStyle):
    """Shard an ``nn.Linear`` by output features (``weight`` and ``bias`` ``Shard(0)``).

    * Input: replicated (every rank passes the same full tensor).
    * Output: this rank's slice of the last (feature) dimension, as a plain tensor.
    * Forward: no collective.
    * Backward: one all-reduce of the input gradient (Megatron's *f*).

    Example::

        >>> parallelize_module(model, mesh, {"fc1": ColwiseParallel()})
    """

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_replicate_1d,
        _prepare_output: PrepareFn | None = make_sharded_output_tensor,
    ) -> None:
        super().__init__(_prepare_input, _prepare_output)


class PairwiseParallel(ParallelStyle):
    """Colwise then Rowwise as a fixed pair, as in Megatron-LM (arXiv:1909.08053).

    Applies to an MLP with an even number of direct ``nn.Linear`` children (pairs in
    registration order), to ``nn.MultiheadAttention`` (swapped for
    :class:`~shardwise.multihead_attention_tp.TensorParallelMultiheadAttention`, heads
    split across ranks) and to ``nn.Transformer`` and its encoder/decoder layers (their
    feed-forward pairs).

    * Input: replicated. ``None`` means :func:`make_input_replicate_1d`.
    * Output: replicated plain tensor. ``None`` means :func:`make_output_tensor`.
    * Forward: one all-reduce per pair. Backward: one all-reduce per pair.

    Example::

        >>> model = parallelize_module(model, mesh, PairwiseParallel())
    """

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        super().__init__(_prepare_input, _prepare_output)

    def input_fn(self) -> PrepareFn:
        """The input function this style applies (``None`` resolved to its default).

        Example::

            >>> PairwiseParallel().input_fn() is make_input_replicate_1d
            True
        """
        return self._prepare_input or make_input_replicate_1d

    def output_fn(self) -> PrepareFn:
        """The output function this style applies (``None`` resolved to its default).

        Example::

            >>> PairwiseParallel().output_fn() is make_output_tensor
            True
        """
        return self._prepare_output or make_output_tensor


class SequenceParallel(PairwiseParallel):
    """PairwiseParallel with sequence-sharded input and output (arXiv:2205.05198).

    Every rank passes its own dim-0 slice (Megatron's ``[seq, batch, hidden]`` layout).

    * Input: this rank's dim-0 slice; all-gathered on entry.
    * Output: this rank's dim-0 slice of the result.
    * Forward: all-gather in, reduce-scatter out. Backward: reduce-scatter in, all-gather out.

    The result equals the single-device module applied to the concatenation of all
    ranks' inputs; parameter gradients are those of the sum of all ranks' losses.

    Example::

        >>> mlp = parallelize_module(mlp, mesh, SequenceParallel())
        >>> y_mine = mlp(x_mine)   # x_mine: [S/W, B, H]
    """

    def __init__(self) -> None:
        super().__init__(make_input_reshard_replicate, make_output_reshard_tensor)
