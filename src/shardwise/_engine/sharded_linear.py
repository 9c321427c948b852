"""Column- and row-parallel ``nn.Linear``: parameter placement and the local hot path.

:func:`parallelize_linear` replaces a Linear's parameters with DTensors and gives the
module a forward that computes on local shards. Its input and output handling is a
:class:`~shardwise._engine.io.ModuleIO`: the seed's layout functions and torch 2.x's
``input_layouts``/``output_layouts`` both become placements, and each placement
transition one autograd-aware collective from :mod:`shardwise._engine.collectives`. A user's own
function, or a transition with no local recipe, runs through DTensor (slower, same values).

Features that the tensor-parallel size does not divide are split like ``torch.chunk``
(DTensor's ``Shard``): ``Linear(8, 6)`` column-parallel on 4 ranks holds 2, 2, 2 and 0
output features.

Example::

    >>> ColumnLinearForward.check(model.fc1, "fc1", world=2)
    >>> ColumnLinearForward.parallelize(model.fc1, mesh, ModuleIO(Replicate(), Shard(-1)))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from . import collectives as C
from .entry_cache import shared_entry
from .forward import ParallelForward, check_installable
from .io import ModuleIO, normalize
from .local_params import distribute_parameter, local_param
from .redistribute import input_to_local, output_from_local
from .sequence_gather import linear_saving_shard

__all__ = ["ColumnLinearForward", "RowLinearForward", "ShardedLinearForward", "check_shardable"]


def check_shardable(name: str, style: str, label: str, size: int, world: int) -> None:
    """Raise ``ValueError`` if ``size`` entries cannot be split over ``world`` ranks.

    Uneven splits are fine (``torch.chunk`` layout); fewer entries than ranks is not.

    Example::

        >>> check_shardable("fc1", "ColwiseParallel", "out_features", 3, 4)
        Traceback (most recent call last):
        ValueError: fc1: ColwiseParallel cannot shard out_features=3 over 4 ranks ...
    """
    if size < world:
        raise ValueError(
            f"{name}: {style} cannot shard {label}={size} over {world} ranks: the "
            f"tensor-parallel size must not exceed it (uneven splits are fine)."
        )


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


class ShardedLinearForward(ParallelForward):
    """What the column and row forwards of a parallelized ``nn.Linear`` share.

    :class:`ColumnLinearForward` and :class:`RowLinearForward` are bound to the module as
    its ``forward`` method; this base holds the layouts decided at install time and the
    short cut to the installed local parameters.
    """

    style: ClassVar[str]  # the style that installs it, for messages
    sharded_feature: ClassVar[str]  # the nn.Linear attribute split over the group
    placements: ClassVar[Mapping[str, Placement]]  # of ``weight`` and ``bias``
    natural_output: ClassVar[Placement]  # the layout of the local result, before any move
    base = nn.Linear

    @classmethod
    def check(cls, module: nn.Module, fqn: str, world: int) -> None:
        """Raise, before any collective, if ``module`` cannot be sharded on ``world`` ranks.

        Example::

            >>> ColumnLinearForward.check(nn.Linear(8, 3), "fc1", 4)
            Traceback (most recent call last):
            ValueError: fc1: ColwiseParallel cannot shard out_features=3 over 4 ranks ...
        """
        name = fqn or type(module).__name__
        if not isinstance(module, nn.Linear):
            raise RuntimeError(
                f"Expect a torch.nn.Linear module but received {type(module)}! "
                f"({cls.style} on '{name}')"
            )
        check_installable(module, name, nn.Linear, cls.style)
        size = getattr(module, cls.sharded_feature)
        check_shardable(name, cls.style, cls.sharded_feature, size, world)

    @classmethod
    def parallelize(cls, module: nn.Linear, mesh: DeviceMesh, io: ModuleIO) -> nn.Linear:
        """Shard ``module``'s parameters on the 1-D ``mesh`` and install this forward.

        Call :meth:`check` first: this communicates (it scatters the weights).

        Example::

            >>> RowLinearForward.parallelize(mlp.fc2, mesh, ModuleIO(Shard(-1), Shard(1)))
        """
        for name, placement in cls.placements.items():
            distribute_parameter(module, name, mesh, placement)
        cls(mesh, io, module).install(module)
        return module

    def __init__(self, mesh: DeviceMesh, io: ModuleIO, module: nn.Linear) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.first = mesh.get_local_rank() == 0
        self.world = mesh.size()
        self.io = io
        self.input_layout = io.input_layout if io.input_fn is None else None
        self.output_layout = io.output_layout if io.output_fn is None else None
        plain = io.input_fn is None and io.output_fn is None and io.use_local_output
        # The common layouts, decided once here rather than on every call.
        self.local_out = plain and _is_last_dim_shard(io.output_layout)  # colwise, no output move
        self.replicate_in = plain and io.input_layout is not None and io.input_layout.is_replicate()
        self.last_dim_in = plain and _is_last_dim_shard(io.input_layout)  # rowwise, input as is
        self.replicate_out = (  # rowwise: the partial sums are all-reduced, the bias added after
            io.output_fn is None and io.output_layout is not None and io.output_layout.is_replicate()
        )
        # (weight, its local leaf, bias, its local leaf) as installed; see _local_params.
        self._installed: tuple[Any, torch.Tensor, Any, torch.Tensor | None] | None = None
        weight, bias = module._parameters["weight"], module._parameters.get("bias")
        if isinstance(weight, DTensor) and (bias is None or isinstance(bias, DTensor)):
            self._installed = (
                weight, weight._local_tensor, bias, None if bias is None else bias._local_tensor
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.io})"

    def _local_params(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``local_param`` of weight and bias, short-cut while they are the ones installed."""
        params = module._parameters
        weight, bias = params["weight"], params.get("bias")
        fast = self._installed
        if (
            fast is not None
            and weight is fast[0]
            and bias is fast[2]
            and torch.is_grad_enabled()
            and weight._local_tensor is fast[1]
            and (bias is None or bias._local_tensor is fast[3])
            and weight.requires_grad
            and (bias is None or bias.requires_grad)
        ):
            return fast[1], fast[3]
        if (
            fast is not None
            and not torch.is_grad_enabled()
            and weight is fast[0]
            and bias is fast[2]
            and weight._local_tensor is fast[1]
            and (bias is None or bias._local_tensor is fast[3])
        ):
            # Inference (no_grad, inference_mode, generate()): nothing is recorded, so the
            # local leaves serve as they are, without local_param's detach per call.
            return fast[1], fast[3]
        w = local_param(weight)
        assert w is not None  # a Linear always has a weight
        b = local_param(bias)
        if (
            isinstance(weight, DTensor)
            and w is weight._local_tensor
            and (bias is None or (isinstance(bias, DTensor) and b is bias._local_tensor))
        ):
            # Adopted after a move (``module.to(...)`` swaps the local tensors): take the
            # short cut again, and let go of the tensors installed before.
            self._installed = (weight, w, bias, b)
        return w, b


class ColumnLinearForward(ShardedLinearForward):
    """Column-parallel ``nn.Linear``: this rank's output features from the whole input.

    ``weight`` and ``bias`` ``Shard(0)``; the local result is ``Shard(-1)``.
    """

    style = "ColwiseParallel"
    sharded_feature = "out_features"
    placements = {"weight": Shard(0), "bias": Shard(0)}
    natural_output = Shard(-1)

    def __init__(self, mesh: DeviceMesh, io: ModuleIO, module: nn.Linear) -> None:
        super().__init__(mesh, io, module)
        self.features = module.out_features  # the global size of the sharded dimension
        # Fed a sequence shard: save the shard and all-gather it again in backward
        # (Megatron's scheme), unless the style asks to save the gathered input.
        self.regather = not io.save_gathered_input

    def __call__(self, module: nn.Linear, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"{type(module).__name__}.forward() missing its input tensor")
        x = args[0]
        w, b = self._local_params(module)
        if self.replicate_in and _is_plain(x):  # the seed default, decided at install
            y = F.linear(shared_entry("f", x, self.group, 0), w, b)
        else:
            y = self._colwise_linear(x, w, b)  # [..., out/W] Shard(-1)
        if self.local_out:
            return y
        return output_from_local(y, Shard(-1), self.io, self.mesh, size=self.features)

    def _colwise_linear(self, x: Any, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        io, group = self.io, self.group
        if io.input_fn is None and io.input_layout is not None and _is_plain(x):
            # One entry collective per activation, however many projections read it.
            src = normalize(io.input_layout, x.dim())
            if src.is_replicate():
                return F.linear(shared_entry("f", x, group, 0), w, b)
            if type(src) is Shard:
                dim = src.dim
                full = shared_entry(
                    "ag", x, group, dim, lambda: C.gather_from_sequence_region(x, group, dim)
                )
                if (
                    not self.regather
                    or not torch.is_grad_enabled()
                    # (autocast has no meta device: explain's dry run computes on meta)
                    or (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type))
                    # An uneven torch.chunk split (3 + 2): the backward re-gather needs
                    # equal pieces. Every rank sees the same gathered length, so every
                    # rank takes the same branch.
                    or full.shape[dim] != x.shape[dim] * self.world
                ):
                    return F.linear(full, w, b)
                # Save the sequence shard, not the gathered input (Megatron's scheme).
                return linear_saving_shard(full, x, w, b, group, dim)
        return F.linear(input_to_local(x, io, Replicate(), self.mesh, partial_grad=True), w, b)


class RowLinearForward(ShardedLinearForward):
    """Row-parallel ``nn.Linear``: partial sums over this rank's input features, then reduced.

    ``weight`` ``Shard(1)``, ``bias`` ``Replicate`` (added once); the local result is ``Partial``.
    """

    style = "RowwiseParallel"
    sharded_feature = "in_features"
    placements = {"weight": Shard(1), "bias": Replicate()}
    natural_output = Partial()

    def __call__(self, module: nn.Linear, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"{type(module).__name__}.forward() missing its input tensor")
        x = args[0]
        w, b = self._local_params(module)
        if self.last_dim_in and _is_plain(x):
            y = F.linear(x, w)  # the seed default: this rank's feature slice; [..., out] Partial
        else:
            y = F.linear(input_to_local(x, self.io, Shard(-1), self.mesh), w)  # [..., out] Partial
        io = self.io
        if self.replicate_out:
            # Replicated output: add the bias after the all-reduce, as hand-written code does;
            # its gradient, taken from the replicated output gradient, is complete everywhere.
            if torch.is_grad_enabled():
                out = C.reduce_from_region(y, self.group)
            else:  # inference: the all-reduce itself, without an autograd Function around it
                out = y
                if self.world > 1:
                    dist.all_reduce(out, group=self.group)
            out = out if b is None else out + b
            return out if io.use_local_output else DTensor.from_local(
                out, self.mesh, [Replicate()], run_check=False
            )
        if b is not None:
            y = _AddBiasOnce.apply(y, b, self.first)
        return output_from_local(y, Partial(), io, self.mesh)


def _is_last_dim_shard(placement: Any) -> bool:
    """``Shard(-1)``, the last-dim shard whatever the tensor's rank."""
    return type(placement) is Shard and placement.dim == -1


def _is_plain(x: Any) -> bool:
    # The exact type first: the common case, without two isinstance walks.
    return type(x) is torch.Tensor or (isinstance(x, torch.Tensor) and not isinstance(x, DTensor))
