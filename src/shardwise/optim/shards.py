"""The local tensors an optimizer step computes with, each checked against its parameter.

An elementwise update of a DTensor parameter is the same update of its local tensor, as
long as the gradient and every state tensor are laid out like the parameter: same mesh,
same placements, same global shape, so the local tensors line up element for element.
That is the case DTensor's dispatcher handles without communicating, by calling the
same kernel on the local tensors; in any other case (a ``Partial`` gradient, state
loaded in another layout) it would redistribute first, and computing on the local
tensors would be wrong. So each tensor is checked here and the step refuses, naming the
tensor, rather than compute on shards that do not line up.

The check costs one identity test when the tensor carries its parameter's own spec
object (gradients handed over by shardwise do) and a comparison of mesh, placements and
shape otherwise (state created by ``torch.zeros_like``).

Example::

    >>> local_params = local_tensors(params)
    >>> local_grads = local_tensors_like(grads, params, "grad")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor

from .._engine.torch_compat import DTensorSpec, dtensor_like

__all__ = ["local_tensor_like", "local_tensors", "local_tensors_like", "wrap_like"]


def local_tensors(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's local tensor (the DTensor's own storage), plain tensors as they are.

    Example::

        >>> local_tensors([dtensor_param, plain_param])   # [its local shard, plain_param]
    """
    # ``_local_tensor`` rather than ``to_local()``: the same tensor, without a call that
    # costs as much as the read (see shardwise._engine.torch_compat).
    return [p._local_tensor if isinstance(p, DTensor) else p for p in params]


def local_tensors_like(
    tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor], what: str
) -> list[torch.Tensor]:
    """The local tensors of ``tensors[i]``, each laid out like ``params[i]`` or an error.

    ``what`` names the tensors in the error (``"grad"``, ``"exp_avg"``...).

    Example::

        >>> local_tensors_like(exp_avgs, params, "exp_avg")
    """
    return [local_tensor_like(t, p, what) for t, p in zip(tensors, params)]


def local_tensor_like(t: torch.Tensor, param: torch.Tensor, what: str) -> torch.Tensor:
    """The local tensor of ``t`` if it is laid out like ``param``, else ValueError.

    A plain parameter's tensors must be plain too, and come back as they are.

    Example::

        >>> local_tensor_like(state["momentum_buffer"], p, "momentum_buffer")
    """
    if isinstance(param, DTensor):
        if isinstance(t, DTensor) and (t._spec is param._spec or _same_layout(t._spec, param._spec)):
            return t._local_tensor
    elif not isinstance(t, DTensor):
        return t
    raise ValueError(_mismatch(t, param, what))


def wrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` as a DTensor laid out like ``like`` (no copy, no collective); plain if ``like`` is.

    What torch's step would have stored: state it creates from a DTensor gradient
    (SGD's momentum buffer, ``grad.clone()``) is a DTensor in the gradient's layout.

    Example::

        >>> state["momentum_buffer"] = wrap_like(local_buffer, grad)
    """
    return dtensor_like(local, like) if isinstance(like, DTensor) else local


def _same_layout(a: DTensorSpec, b: DTensorSpec) -> bool:
    # On the specs rather than the DTensors: a DTensor's properties cost several times more.
    return a.mesh == b.mesh and a.placements == b.placements and a.shape == b.shape


def _describe(t: torch.Tensor) -> str:
    if isinstance(t, DTensor):
        return f"a DTensor {tuple(t.placements)} of shape {list(t.shape)} on {t.device_mesh}"
    return f"a plain tensor of shape {list(t.shape)}"


def _mismatch(t: torch.Tensor, p: torch.Tensor, what: str) -> str:
    return (
        f"step_on_local_shards: the {what} of a parameter that is {_describe(p)} is "
        f"{_describe(t)}; the local step needs both laid out alike (torch's own step "
        f"would redistribute it every step). Reduce or redistribute it to the "
        f"parameter's placements, or use torch's own step for this optimizer."
    )
