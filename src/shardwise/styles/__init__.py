"""Parallel styles: what each style is, and what it does to the module it is given.

=================  ===========================================================================
``base``           ``ParallelStyle`` (the seed's class), ``ModuleStyle`` (expand/check/apply),
                   ``PlanContext``
``linear``         ``ColwiseParallel``, ``RowwiseParallel`` on ``nn.Linear`` and ``nn.Embedding``
``composite``      ``PairwiseParallel``, ``SequenceParallel``: plans that expand into primitives
``mlp_pairs``      which Linears of an MLP or Transformer layer form Colwise/Rowwise pairs
``primitives``     sharded norms, dropouts, attention and sequence-sharded layers
``heads``          attention head splits: ``AttentionHeads``, ``ColwiseHeads``, ``RowwiseHeads``
``prepare``        ``PrepareModuleInput``, ``PrepareModuleOutput``, ``PrepareModuleInputOutput``
=================  ===========================================================================

The seed's import path, :mod:`shardwise.style`, re-exports the public names.
"""
