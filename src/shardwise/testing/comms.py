"""Counting collectives, for tests that assert a communication budget.

Example::

    >>> fwd, bwd = fwd_bwd_counts(model, x)
    >>> assert fwd == {ALL_REDUCE: 2} and bwd == {ALL_REDUCE: 2}
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

__all__ = ["ALL_REDUCE", "ALL_GATHER", "REDUCE_SCATTER", "comm_counts", "fwd_bwd_counts"]

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "allreduce_", "_allgather_base_", "_reduce_scatter_base_"


def comm_counts(comm: CommDebugMode) -> dict[str, int]:
    """Collectives seen by ``comm``, keyed by short c10d op name (zero counts dropped).

    Example::

        >>> with CommDebugMode() as comm:
        ...     model(x)
        >>> comm_counts(comm)
        {'allreduce_': 2}
    """
    out: dict[str, int] = {}
    for op, n in comm.get_comm_counts().items():
        if n:
            name = str(op).split(".")[-1]
            out[name] = out.get(name, 0) + n
    return out


def fwd_bwd_counts(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Collectives of one forward and of its backward (loss: sum of the local output), after a warm-up forward.

    Example::

        >>> fwd_bwd_counts(parallelize_module(mlp, mesh, PairwiseParallel()), x)
        ({'allreduce_': 1}, {'allreduce_': 1})
    """
    # One forward first: the first sequence-parallel gather of a new size also agrees on
    # a buffer capacity (a second all-gather, once; see shardwise.sized_gather).
    with torch.no_grad():
        model(x.detach())
    if x.is_floating_point():
        x = x.requires_grad_()
    with CommDebugMode() as fwd:
        y = model(x)
    with CommDebugMode() as bwd:
        (y.to_local() if isinstance(y, DTensor) else y).sum().backward()
    return comm_counts(fwd), comm_counts(bwd)
