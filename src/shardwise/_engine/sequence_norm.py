"""Norms on sequence-sharded activations (the "SP region" of Megatron's sequence parallelism).

Between a row-parallel layer that reduce-scatters onto the sequence dimension and the
next column-parallel layer that all-gathers it, LayerNorm/RMSNorm run on this rank's
sequence shard. Their weights are replicated (``Replicate`` DTensors), but each rank
sees only its tokens, so each rank's weight gradient is a partial sum: it is all-reduced
over the TP group before it reaches ``param.grad``. Forgetting that sum is the classic
silent sequence-parallel bug; here it cannot be forgotten.

Example::

    >>> parallelize_module(block, mesh, {"ln1": SequenceParallel(), "ln2": SequenceParallel()})
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from .forward import ParallelForward, check_installable
from .local_params import distribute_parameter

__all__ = ["NORM_TYPES", "check_norm", "is_norm", "shard_norm"]

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that :func:`shard_norm` supports (LayerNorm, RMSNorm).

    Example::

        >>> is_norm(nn.LayerNorm(8))
        True
    """
    return isinstance(module, NORM_TYPES)


def _norm_class(module: nn.Module) -> type[nn.Module]:
    """The torch norm class ``module`` is (LayerNorm or RMSNorm): the forward it computes."""
    return next(c for c in NORM_TYPES if isinstance(module, c))


def check_norm(module: nn.Module, fqn: str) -> None:
    """Raise (no communication) if ``module`` cannot run sequence-parallel.

    Example::

        >>> check_norm(nn.LayerNorm(8), "ln1")
    """
    check_installable(module, fqn, _norm_class(module), "SequenceParallel")


class _NormForward(ParallelForward):
    """LayerNorm/RMSNorm on whatever sequence shard it is given (no collective in forward)."""

    def __init__(self, module: nn.Module, mesh: DeviceMesh) -> None:
        self.group = mesh.get_group()
        self.layer_norm = isinstance(module, nn.LayerNorm)
        self.summed = frozenset(name for name, _ in module.named_parameters(recurse=False))

    def __repr__(self) -> str:
        return "_NormForward()"

    def __call__(self, module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.layer_norm:
            return F.layer_norm(
                x, module.normalized_shape, self.param(module, "weight"), self.param(module, "bias"),
                module.eps,
            )
        return F.rms_norm(x, module.normalized_shape, self.param(module, "weight"), module.eps)


def shard_norm(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replicate ``module``'s parameters on ``mesh`` and sum their gradients over it.

    Input and output are this rank's sequence shard (plain tensors); no collective runs
    in forward; in backward one all-reduce per parameter gradient.

    Example::

        >>> shard_norm(block.ln1, mesh)
    """
    for name, _ in list(module.named_parameters(recurse=False)):
        distribute_parameter(module, name, mesh, Replicate(), sum_grads=True)
    return _NormForward(module, mesh).install(module, _norm_class(module))
