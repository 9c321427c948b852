"""Local views of DTensor parameters whose gradients land back on the DTensor.

Parameters are stored as ``nn.Parameter(DTensor)`` so that ``state_dict``, optimizers,
FSDP and DCP see global shapes and placements. The hot path, however, computes on the
local shard. Routing that through ``DTensor.to_local()`` costs an autograd Function and a
``DTensor.from_local`` per parameter per step. Instead the local tensor inside the
parameter is made an autograd leaf itself, and its gradient is moved into
``param.grad``, as a DTensor with the parameter's own spec, when the backward pass ends
(:mod:`shardwise._engine.grad_handoff`).

A parameter whose local tensor was swapped in by someone else (``module.to(...)``, or
FSDP's unsharded parameters) is adopted on first use; its gradients are handed over as
soon as autograd has them, since such a framework's hooks may read them during backward.
A parameter that is not a leaf takes the ordinary ``to_local()`` route.

Example::

    >>> w = local_param(linear.weight)   # plain tensor, gradient flows to linear.weight.grad
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from .grad_handoff import _OWNER, handoffs

__all__ = ["distribute_parameter", "install_local_leaf", "local_param", "with_local_tensor"]

_SUM_OVER = "_shardwise_sum_grads_over"  # the group given to install_local_leaf


def install_local_leaf(
    param: torch.nn.Parameter,
    sum_grads_over: ProcessGroup | None = None,
    *,
    at_once: bool = False,
) -> None:
    """Make ``param``'s local tensor a gradient-tracking leaf owned by ``param``.

    Gradients reach ``param.grad`` when the backward pass ends, all at once (see
    :mod:`shardwise._engine.grad_handoff`); with ``at_once`` each is handed over as soon as autograd has
    accumulated it, for parameters another framework's hooks read during backward.
    With ``sum_grads_over``, each gradient is all-reduced over that group before it is
    handed to ``param.grad`` (replicated weights applied to sequence-sharded inputs).

    Example::

        >>> install_local_leaf(linear.weight)
        >>> install_local_leaf(layer_norm.weight, sum_grads_over=mesh.get_group())
    """
    local: torch.Tensor = param._local_tensor  # type: ignore[attr-defined]
    local.requires_grad_(True)
    # A plain reference, not a weak one: ``torch.utils.swap_tensors`` (what ``module.to``,
    # ``.double()`` and ``to_empty`` use on DTensor parameters) refuses a tensor that has
    # weak references. The cycle param -> local -> param is one the garbage collector
    # sees (both live in the tensors' Python state), and the hook finds the owner here.
    setattr(local, _OWNER, param)
    local.register_post_accumulate_grad_hook(handoffs.hook(sum_grads_over, at_once=at_once))
    setattr(local, _SUM_OVER, sum_grads_over)


def local_param(
    param: torch.Tensor | None, sum_over: ProcessGroup | None = None
) -> torch.Tensor | None:
    """The local tensor to compute with for ``param`` (a DTensor parameter, or plain).

    ``sum_over`` is the group its gradients are summed over (as installed), for a local
    tensor someone swapped in since (``module.to(...)``, ``to_empty``): it is set up
    again with the same sum, which the swapped-in tensor itself cannot carry.

    Example::

        >>> y = torch.nn.functional.linear(x, local_param(m.weight), local_param(m.bias))
    """
    if param is None or not isinstance(param, DTensor):
        return param
    if not param.requires_grad or not torch.is_grad_enabled():
        return param._local_tensor.detach()
    local = param._local_tensor
    owner = getattr(local, _OWNER, None)
    if param.is_leaf and owner is param:
        return local
    if isinstance(param, torch.nn.Parameter) and param.is_leaf and owner is None:
        # A parameter swapped in by someone else (``module.to(...)``, or FSDP's unsharded
        # parameters): adopt its local tensor. Its gradient is handed over at once, since
        # such a framework's own hooks may read it before the backward pass ends.
        install_local_leaf(param, sum_over, at_once=True)
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


def with_local_tensor(param: nn.Parameter, local: torch.Tensor) -> nn.Parameter:
    """A new DTensor parameter like ``param`` (same mesh, placements, global shape) holding
    ``local`` as this rank's shard, its gradient handed over as ``param``'s was.

    This materializes a model parallelized on the meta device: ``local`` is the real
    shard (any dtype); no collective runs.

    Example::

        >>> linear.weight = with_local_tensor(linear.weight, torch.empty(local_shape))
    """
    assert isinstance(param, DTensor)
    dt = DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False,
        shape=param.shape, stride=param.stride(),
    )
    new = nn.Parameter(dt, requires_grad=param.requires_grad)
    old = param._local_tensor
    if getattr(old, _OWNER, None) is not None:
        install_local_leaf(new, getattr(old, _SUM_OVER, None))
    return new
