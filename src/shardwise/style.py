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
``nn.Embedding``); :mod:`shardwise.styles.prepare` has ``PrepareModuleInput``/``Output``.

Example::

    >>> parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

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
from .styles.base import ModuleStyle, ParallelStyle
from .styles.composite import PairwiseParallel, SequenceParallel
from .styles.linear import ColwiseParallel, RowwiseParallel
from .styles.prepare import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput

__all__ = [
    "ColwiseParallel",
    "ModuleStyle",
    "PairwiseParallel",
    "ParallelStyle",
    "PrepareModuleInput",
    "PrepareModuleInputOutput",
    "PrepareModuleOutput",
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
