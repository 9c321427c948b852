"""Column- and row-parallel ``Conv1D``, the transposed Linear of transformers' GPT-2.

``Conv1D(nf, nx)`` stores ``weight`` as ``[nx, nf]`` (in, out) and computes
``y = x @ W + b``, so the dimensions swap relative to ``nn.Linear``:

=====================  ==========================  ============  ======================
style                  weight ``[nx, nf]``         bias          forward / backward
=====================  ==========================  ============  ======================
``ColwiseConv1D()``    ``Shard(1)``                ``Shard(0)``  none / all-reduce (f)
``ColwiseConv1D(3)``   ``_StridedShard(1, sf=3)``  same, dim 0   none / all-reduce (f)
``RowwiseConv1D()``    ``Shard(0)``                replicated    all-reduce (g) / none
=====================  ==========================  ============  ======================

GPT-2's ``c_attn`` fuses q|k|v into one ``[E, 3E]`` weight. Rank r needs columns
``q_r | k_r | v_r`` (its heads of each), which are not one contiguous chunk.
``ColwiseConv1D(parts=3)`` stores it as ``_StridedShard(1, split_factor=3)``: "split into
3 parts, then shard each part over the mesh", the layout torch uses for FSDP2 + TP. The
local tensor is exactly ``[q_r | k_r | v_r]``, ``full_tensor()`` and ``state_dict``
see the original ``[E, 3E]`` weight, gradients stay sharded (no weight all-reduce) and
the parameter keeps its name. ``_StridedShard`` is private torch API (FSDP2 + TP's own
layout), imported through :mod:`shardwise._engine.torch_compat` like every other.

Example::

    >>> plan = {"transformer.h.*.attn.c_attn": ColwiseConv1D(parts=3),
    ...         "transformer.h.*.attn.c_proj": RowwiseConv1D()}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import Placement, Replicate, Shard

from .._engine import collectives as C
from .._engine.forward import ParallelForward, check_installable
from .._engine.local_params import distribute_parameter, local_param
from .._engine.torch_compat import StridedShard
from ..styles.base import ModuleStyle

__all__ = ["ColwiseConv1D", "RowwiseConv1D", "is_conv1d"]


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (checked by shape, without importing it).

    Example::

        >>> is_conv1d(model.transformer.h[0].attn.c_attn)
        True
    """
    weight = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Conv1D"
        and isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (nx, nf)
    )


def _conv1d_class(module: nn.Module) -> type[nn.Module]:
    """transformers' ``Conv1D`` class in ``module``'s class hierarchy (the base it computes)."""
    return next((c for c in type(module).__mro__ if c.__name__ == "Conv1D"), type(module))


def _check(module: Any, fqn: str, style: str, features: int, label: str, split: int) -> None:
    name = fqn or type(module).__name__
    if not is_conv1d(module):
        raise TypeError(
            f"Expect a transformers Conv1D module but received {type(module)}! "
            f"({style} on '{name}')"
        )
    check_installable(module, name, _conv1d_class(module), style)
    if features % split:
        raise ValueError(
            f"{name}: {style} splits {label}={features} into {split} equal pieces "
            "(parts x tensor-parallel size); it is not divisible."
        )


class _Conv1DForward(ParallelForward):
    """The local forward of a sharded Conv1D (bound to it as a method)."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _ColumnConv1DForward(_Conv1DForward):
    """Replicated input in, this rank's output features out."""

    input_layout = Replicate()
    output_layout = Shard(-1)

    def __call__(
        self, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        w, b = local_param(module.weight), local_param(module.bias)  # type: ignore[arg-type]
        assert w is not None
        lead = x.shape[:-1]
        if torch.is_grad_enabled() and x.requires_grad:
            x = C.copy_to_region(x, self.group)  # f: all-reduce the input grad in backward
        flat = x.reshape(-1, x.shape[-1])  # [N, nx]
        y = flat @ w if b is None else torch.addmm(b, flat, w)  # [N, nf/W]
        return y.view(*lead, -1)


class _RowConv1DForward(_Conv1DForward):
    """This rank's input features in, partial sums all-reduced, the bias added after."""

    output_layout = Replicate()

    def __call__(
        self, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        w, b = local_param(module.weight), local_param(module.bias)  # type: ignore[arg-type]
        assert w is not None
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]) @ w  # [N, nx/W] @ [nx/W, nf]: a partial sum
        y = C.reduce_from_region(y, self.group)  # g: [N, nf] replicated
        if b is not None:
            y = y + b
        return y.view(*lead, -1)


class ColwiseConv1D(ModuleStyle):
    """Shard a ``Conv1D`` by output features; ``parts > 1`` for fused projections.

    * Input: replicated. Forward: no collective; backward: one all-reduce of the input grad.
    * Output: this rank's features as a plain tensor: ``[..., nf/W]``; with ``parts=3``
      (GPT-2 ``c_attn``) that is ``[..., q_r | k_r | v_r]``, each ``nf/(3W)`` wide.
    * ``nf`` must be divisible by ``parts * W``.

    Example::

        >>> parallelize_module(gpt2, mesh, {"transformer.h.*.mlp.c_fc": ColwiseConv1D(),
        ...                                 "transformer.h.*.attn.c_attn": ColwiseConv1D(parts=3)})
    """

    def __init__(self, parts: int = 1) -> None:
        super().__init__()
        if not isinstance(parts, int) or parts < 1:
            raise ValueError(f"parts must be a positive int, got {parts!r}")
        self.parts = parts

    def __repr__(self) -> str:
        return "ColwiseConv1D()" if self.parts == 1 else f"ColwiseConv1D(parts={self.parts})"

    def _placement(self, dim: int) -> Placement:
        return Shard(dim) if self.parts == 1 else StridedShard(dim, split_factor=self.parts)

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) on a non-Conv1D or an indivisible ``nf``.

        Example::

            >>> ColwiseConv1D(parts=3).check(gpt2.transformer.h[0].attn.c_attn, "c_attn", mesh)
        """
        nf = getattr(module, "nf", 0)
        _check(module, fqn, repr(self), nf, "nf", self.parts * mesh.size())

    def apply(self, module: Any, mesh: Any) -> Any:
        """Shard the weight and bias and install the local forward; returns ``module``.

        Example::

            >>> ColwiseConv1D(parts=3).apply(gpt2.transformer.h[0].attn.c_attn, mesh)
        """
        distribute_parameter(module, "weight", mesh, self._placement(1))
        distribute_parameter(module, "bias", mesh, self._placement(0))
        _ColumnConv1DForward(mesh.get_group()).install(module, _conv1d_class(module))
        return module


class RowwiseConv1D(ModuleStyle):
    """Shard a ``Conv1D`` by input features (weight ``Shard(0)``, bias replicated).

    * Input: this rank's last-dim slice ``[..., nx/W]`` (a column-parallel layer's output).
    * Output: the full result, identical on every rank, as a plain tensor.
    * Forward: one all-reduce; the bias is added after it. Backward: no collective.

    Example::

        >>> parallelize_module(gpt2, mesh, {"transformer.h.*.mlp.c_proj": RowwiseConv1D()})
    """

    def __init__(self) -> None:
        super().__init__()

    def __repr__(self) -> str:
        return "RowwiseConv1D()"

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) on a non-Conv1D or an indivisible ``nx``.

        Example::

            >>> RowwiseConv1D().check(gpt2.transformer.h[0].mlp.c_proj, "c_proj", mesh)
        """
        nx = getattr(module, "nx", 0)
        _check(module, fqn, repr(self), nx, "nx", mesh.size())

    def apply(self, module: Any, mesh: Any) -> Any:
        """Shard the weight, replicate the bias and install the local forward; returns ``module``.

        Example::

            >>> RowwiseConv1D().apply(gpt2.transformer.h[0].mlp.c_proj, mesh)
        """
        distribute_parameter(module, "weight", mesh, Shard(0))
        distribute_parameter(module, "bias", mesh, Replicate())
        _RowConv1DForward(mesh.get_group()).install(module, _conv1d_class(module))
        return module
