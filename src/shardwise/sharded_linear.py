"""Column- and row-parallel ``nn.Linear``: parameter placement and the local hot path.

:func:`shard_linear` replaces a Linear's parameters with DTensors and gives the module
a forward that computes on local shards. Known seed layout functions become one
autograd-aware collective from :mod:`shardwise.collectives`; any other function (a
user's own) runs through DTensor, which is slower but has the same values.

Example::

    >>> shard_linear(model.fc1, mesh, "colwise", make_input_replicate_1d, make_sharded_output_tensor)
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from . import collectives as C
from .layouts import (
    make_input_replicate_1d,
    make_input_reshard_replicate,
    make_input_shard_1d,
    make_input_shard_1d_last_dim,
    make_output_reshard_tensor,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .local_params import install_local_leaf, local_param

__all__ = ["Role", "shard_linear", "check_linear", "distribute_parameter"]

Role = Literal["colwise", "rowwise"]
PrepareFn = Any


def check_linear(module: nn.Module, fqn: str, role: Role, world: int) -> None:
    """Raise before any collective if ``module`` cannot be sharded ``role``-wise on ``world`` ranks.

    Example::

        >>> check_linear(nn.Linear(8, 6), "fc1", "colwise", 4)
        Traceback (most recent call last):
        ValueError: fc1: ColwiseParallel shards out_features=6, which is not divisible by ...
    """
    name = fqn or type(module).__name__
    if not isinstance(module, nn.Linear):
        raise RuntimeError(
            f"Expect a torch.nn.Linear module but received {type(module)}! "
            f"({role} style on '{name}')"
        )
    if isinstance(module.weight, DTensor):
        raise RuntimeError(f"'{name}' is already parallelized (its weight is a DTensor).")
    features, label = (
        (module.out_features, "out_features")
        if role == "colwise"
        else (module.in_features, "in_features")
    )
    if features % world != 0:
        style = "ColwiseParallel" if role == "colwise" else "RowwiseParallel"
        raise ValueError(
            f"{name}: {style} shards {label}={features}, which is not divisible by the "
            f"tensor-parallel size {world}."
        )


def distribute_parameter(
    module: nn.Module, name: str, mesh: DeviceMesh, placement: Shard | Replicate
) -> None:
    """Replace ``module.<name>`` by an ``nn.Parameter(DTensor)`` scattered from mesh coordinate 0.

    Example::

        >>> distribute_parameter(linear, "weight", mesh, Shard(0))
    """
    param = getattr(module, name)
    if param is None:
        return
    dt = distribute_tensor(param.detach(), mesh, [placement])
    new = nn.Parameter(dt, requires_grad=param.requires_grad)
    module.register_parameter(name, new)
    install_local_leaf(new)


class _AddBiasOnce(torch.autograd.Function):
    """Add the bias to a partial sum on mesh coordinate 0 only, so the sum counts it once.

    The gradient reaching a partial sum is the full output gradient on every rank (the
    backward of all-reduce is identity, that of reduce-scatter an all-gather), so each
    rank computes the complete bias gradient locally: no extra collective. ``y`` is a
    fresh matmul result, so it is updated in place.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, bias: torch.Tensor, first: bool) -> torch.Tensor:
        if first:
            y.add_(bias)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, grad.reshape(-1, grad.shape[-1]).sum(0), None


_SHARED: dict[tuple[Any, ...], torch.Tensor] = {}


def _shared_entry(
    kind: str, x: torch.Tensor, group: Any, dim: int, make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Run an input collective once per (tensor, group), however many layers consume it.

    q, k and v projections (or a gate and an up projection) read the same activation.
    Giving them one shared entry tensor means one all-gather in forward, and autograd
    sums their gradients before the entry's backward runs, so one all-reduce or
    reduce-scatter in backward, as in Megatron's fused QKV.

    An entry lives exactly as long as its source tensor: it is dropped by a finalizer
    when the source is freed (entries never reference their source, so this happens
    when the model's forward lets go of it).
    """
    if kind == "f" and not (torch.is_grad_enabled() and x.requires_grad):
        return x  # no gradient will flow back: the identity needs no collective either
    source = _alias_source(x)
    key = (kind, id(source), source._version, id(group), dim, torch.is_grad_enabled())
    entry = _SHARED.get(key)
    if entry is None:
        entry = make()
        _SHARED[key] = entry
        weakref.finalize(source, _SHARED.pop, key, None)
    return entry


def _alias_source(x: torch.Tensor) -> torch.Tensor:
    """The tensor ``x`` aliases whole, if it is such a view, else ``x``.

    Module backward hooks (``register_full_backward_hook``, and tools built on them such
    as CommDebugMode) hand each module an identity view of its input; q, k and v then
    receive three different objects for one activation.
    """
    base = x._base
    if (
        base is not None
        and base.shape == x.shape
        and base.stride() == x.stride()
        and base.storage_offset() == x.storage_offset()
        and base.dtype == x.dtype
    ):
        return base
    return x


class ShardedLinearForward:
    """The forward installed on a parallelized ``nn.Linear`` (bound to it as a method)."""

    def __init__(
        self, role: Role, mesh: DeviceMesh, prepare_input: PrepareFn, prepare_output: PrepareFn
    ) -> None:
        self.role = role
        self.mesh = mesh
        self.group = mesh.get_group()
        self.first = mesh.get_local_rank() == 0
        self.prepare_input = prepare_input
        self.prepare_output = prepare_output

    def __repr__(self) -> str:
        return (
            f"ShardedLinearForward({self.role}, in={_name(self.prepare_input)}, "
            f"out={_name(self.prepare_output)})"
        )

    def __call__(self, module: nn.Linear, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"{type(module).__name__}.forward() missing its input tensor")
        x = args[0]
        w, b = local_param(module.weight), local_param(module.bias)
        if self.role == "colwise":
            y = F.linear(self._colwise_input(x), w, b)
            return self._colwise_output(y)
        y = F.linear(self._rowwise_input(x), w)
        if b is not None:
            y = _AddBiasOnce.apply(y, b, self.first)
        return self._rowwise_output(y)

    # -- inputs ---------------------------------------------------------------------
    def _colwise_input(self, x: Any) -> torch.Tensor:
        fn = self.prepare_input
        if fn is None:
            return x
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            group = self.group
            if fn is make_input_replicate_1d:
                return _shared_entry("f", x, group, 0, lambda: C.copy_to_region(x, group))
            if fn is make_input_reshard_replicate or fn is make_input_shard_1d:
                return _shared_entry(
                    "ag", x, group, 0, lambda: C.gather_from_sequence_region(x, group, 0)
                )
        dt = fn(x, self.mesh)
        # Column-parallel compute leaves a partial input gradient: say so, and DTensor sums it.
        return dt.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def _rowwise_input(self, x: Any) -> torch.Tensor:
        fn = self.prepare_input
        if fn is None:
            return x
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            if fn is make_input_shard_1d_last_dim:
                return x
            if fn is make_input_replicate_1d:
                return C.scatter_to_region(x, self.group, -1)
        dt = fn(x, self.mesh)
        return dt.redistribute(self.mesh, [Shard(dt.dim() - 1)]).to_local()

    # -- outputs --------------------------------------------------------------------
    def _colwise_output(self, y: torch.Tensor) -> Any:
        fn = self.prepare_output
        if fn is make_sharded_output_tensor:
            return y
        if fn is make_output_tensor:
            return C.gather_from_region(y, self.group, -1)
        dt = DTensor.from_local(y, self.mesh, [Shard(y.dim() - 1)], run_check=False)
        return dt if fn is None else fn(dt, self.mesh)

    def _rowwise_output(self, y: torch.Tensor) -> Any:
        fn = self.prepare_output
        if fn is make_output_tensor:
            return C.reduce_from_region(y, self.group)
        if fn is make_output_reshard_tensor:
            return C.reduce_scatter_to_sequence_region(y, self.group, 0)
        dt = DTensor.from_local(y, self.mesh, [Partial()], run_check=False)
        return dt if fn is None else fn(dt, self.mesh)


def _name(fn: Any) -> str:
    return "None" if fn is None else getattr(fn, "__name__", repr(fn))


def shard_linear(
    module: nn.Linear,
    mesh: DeviceMesh,
    role: Role,
    prepare_input: PrepareFn,
    prepare_output: PrepareFn,
) -> nn.Linear:
    """Shard ``module`` column- or row-wise on the 1-D ``mesh`` and install its local forward.

    Call :func:`check_linear` first: this function communicates (it scatters weights).

    Example::

        >>> shard_linear(mlp.fc2, mesh, "rowwise", make_input_shard_1d_last_dim, make_output_tensor)
    """
    if role == "colwise":
        distribute_parameter(module, "weight", mesh, Shard(0))
        distribute_parameter(module, "bias", mesh, Shard(0))
    else:
        distribute_parameter(module, "weight", mesh, Shard(1))
        distribute_parameter(module, "bias", mesh, Replicate())
    forward = ShardedLinearForward(role, mesh, prepare_input, prepare_output)
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    return module
