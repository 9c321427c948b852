"""Local views of DTensor parameters whose gradients land back on the DTensor.

Parameters are stored as ``nn.Parameter(DTensor)`` so that ``state_dict``, optimizers,
FSDP and DCP see global shapes and placements. The hot path, however, computes on the
local shard. Routing that through ``DTensor.to_local()`` costs an autograd Function and a
``DTensor.from_local`` per parameter per step. Instead the local tensor inside the
parameter is made an autograd leaf itself; a post-accumulate-grad hook moves each
gradient into ``param.grad`` as a DTensor with the parameter's own spec.

Parameters that shardwise did not install (FSDP's unsharded views, for example) are not
leaves it owns, so they take the ordinary ``to_local()`` route, which autograd connects.

Example::

    >>> w = local_param(linear.weight)   # plain tensor, gradient flows to linear.weight.grad
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

__all__ = ["distribute_parameter", "install_local_leaf", "local_param"]

_OWNER = "_shardwise_owner"


def _grad_mover(owner_ref: weakref.ref[nn.Parameter], group: ProcessGroup | None) -> Any:
    """The post-accumulate-grad hook that hands a local leaf's gradient to its DTensor owner.

    A closure over the owner and the group, so the hook (run once per parameter per
    backward) reads no tensor attributes beyond ``grad``.
    """

    def move(local: torch.Tensor) -> None:
        grad = local.grad
        local.grad = None
        owner = owner_ref()
        if owner is None or grad is None:
            return
        if group is not None:
            # A replicated parameter used on sharded activations: each rank holds a partial sum.
            dist.all_reduce(grad, group=group)
        owner_grad = owner.grad
        if owner_grad is None:
            # ``DTensor.__new__`` (C++ in recent torch) without the Python ``__init__``
            # wrappers, which do nothing here and cost twice as much as the tensor itself.
            owner.grad = DTensor.__new__(DTensor, grad, owner._spec, requires_grad=False)  # type: ignore[attr-defined]
        else:
            owner_grad._local_tensor.add_(grad)  # type: ignore[attr-defined]

    return move


def install_local_leaf(param: torch.nn.Parameter, sum_grads_over: ProcessGroup | None = None) -> None:
    """Make ``param``'s local tensor a gradient-tracking leaf owned by ``param``.

    With ``sum_grads_over``, each gradient is all-reduced over that group before it is
    handed to ``param.grad`` (replicated weights applied to sequence-sharded inputs).

    Example::

        >>> install_local_leaf(linear.weight)
        >>> install_local_leaf(layer_norm.weight, sum_grads_over=mesh.get_group())
    """
    local: torch.Tensor = param._local_tensor  # type: ignore[attr-defined]
    local.requires_grad_(True)
    owner_ref = weakref.ref(param)
    setattr(local, _OWNER, owner_ref)
    local.register_post_accumulate_grad_hook(_grad_mover(owner_ref, sum_grads_over))


def local_param(param: torch.Tensor | None) -> torch.Tensor | None:
    """The local tensor to compute with for ``param`` (a DTensor parameter, or plain).

    Example::

        >>> y = torch.nn.functional.linear(x, local_param(m.weight), local_param(m.bias))
    """
    if param is None or not isinstance(param, DTensor):
        return param
    if not param.requires_grad or not torch.is_grad_enabled():
        return param._local_tensor.detach()
    local = param._local_tensor
    owner = getattr(local, _OWNER, None)
    if owner is not None and owner() is param and param.is_leaf:
        return local
    if isinstance(param, torch.nn.Parameter) and param.is_leaf and owner is None:
        # A parameter whose data was swapped (``module.to(...)``): adopt the new local.
        install_local_leaf(param)
        return local
    return param.to_local()


def distribute_parameter(
    module: nn.Module,
    name: str,
    mesh: DeviceMesh,
    placement: Placement,
    *,
    sum_grads: bool = False,
) -> None:
    """Replace ``module.<name>`` by an ``nn.Parameter(DTensor)`` scattered from mesh coordinate 0.

    The new parameter's local tensor becomes a gradient leaf (:func:`install_local_leaf`).
    With ``sum_grads``, its gradients are summed over the mesh (a replicated weight used
    on sharded activations). A missing parameter (``bias=None``) is left alone.

    Example::

        >>> distribute_parameter(linear, "weight", mesh, Shard(0))
        >>> distribute_parameter(norm, "weight", mesh, Replicate(), sum_grads=True)
    """
    param = getattr(module, name)
    if param is None:
        return
    dt = distribute_tensor(param.detach(), mesh, [placement])
    new = nn.Parameter(dt, requires_grad=param.requires_grad)
    module.register_parameter(name, new)
    install_local_leaf(new, sum_grads_over=mesh.get_group() if sum_grads and mesh.size() > 1 else None)
