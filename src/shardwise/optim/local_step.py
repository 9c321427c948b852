"""torch's SGD, Adam and AdamW, stepping the local shards of DTensor parameters.

The parameters of a parallelized model are DTensors, and so is the state torch creates
for them (``torch.zeros_like`` of a DTensor is one); that is what lets ``state_dict``,
DCP, resharding and FSDP see the global picture. torch's step then sends every
elementwise op of the update through DTensor's dispatcher, which works out the layout
of the result and calls the same kernel on the local tensors: ``_foreach_add_`` over 24
small tensors takes 44 us on DTensors and 13 us on plain ones.

:func:`step_on_local_shards` gives an optimizer a ``step`` that makes that kernel call
itself. It is torch's own ``step``, line for line, with one change: the tensor lists
handed to torch's functional optimizer (``torch.optim.adam.adam``,
``torch.optim.sgd.sgd``) hold each DTensor's local tensor, which shares its storage, so
the update lands in the same DTensor objects. Why that is bit for bit torch's update:

- **State** is created by torch's own ``_init_group``: DTensors laid out like their
  parameter, and the ``step`` counter as torch makes it (a plain 0-dim float32 on the
  CPU; on the parameter's device with ``capturable`` or ``fused``).
- **Arithmetic** is torch's functional with the group's options as they are at this
  step (an LR scheduler's ``lr``, a tensor ``lr`` included). On DTensors laid out alike,
  the dispatcher runs each op as that same op on the local tensors, a foreach op as one
  foreach call on the list of local tensors: same kernels, same order, same scalars
  (bias corrections come from the same plain ``step`` tensors). Every tensor is checked
  to be laid out like its parameter (:mod:`shardwise.optim.shards`), or the step raises.
- **Grouping** by device and dtype inside the functional is the same, since a DTensor
  reports its local tensor's device and dtype.
- **Implementation**: ``foreach``/``fused`` as the group says. Left to the default
  (``None``), torch runs its per-parameter loop for a group holding a DTensor (its
  foreach default covers plain tensors only), and so does the local step. The update of
  each element depends only on that element, so a group mixing DTensors and plain
  tensors in one foreach call (which torch refuses on DTensors) gives every tensor what
  separate groups would.

What it refuses, at install and at every step, naming the option: ``differentiable=True``
(the update is not recorded for autograd), an optimizer whose ``step`` is not torch's
own (another class, or a subclass that overrides it), options this torch's optimizer
has that the local step does not know, and an ``optimizer.step`` already wrapped by
something else (an LR scheduler wraps it when it is built: install first).

Example::

    >>> opt = step_on_local_shards(torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import Adam, adam
from torch.optim.optimizer import Optimizer
from torch.optim.sgd import SGD, sgd

from .shards import local_tensor_like, local_tensors, local_tensors_like, wrap_like

__all__ = ["step_on_local_shards"]

_O = TypeVar("_O", bound=Optimizer)
_Closure = Callable[[], Any] | None

#: Every option of torch 2.13's Adam/AdamW and SGD. An optimizer with another one (a
#: newer torch) is refused: stepping it without that option would not be torch's update.
_ADAM_OPTIONS = frozenset(
    {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
     "differentiable", "fused", "decoupled_weight_decay"}
)
_SGD_OPTIONS = frozenset(
    {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
     "differentiable", "fused"}
)
#: Set on the installed step, so a second install is a no-op.
_MARK = "_shardwise_local_step"


def step_on_local_shards(optimizer: _O) -> _O:
    """Make ``optimizer.step()`` update DTensor parameters through their local tensors.

    ``optimizer`` is a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a subclass that
    keeps torch's ``step``) over any mix of DTensor and plain parameters, on any meshes.
    The same object is returned, with an instance ``step`` that runs torch's own step
    on the local tensors (see the module docstring for why it is bit for bit torch's):
    parameters and state stay the same DTensors, so ``state_dict()``, DCP,
    :func:`~shardwise.checkpoint.save_checkpoint` and ``load_state_dict`` are unchanged,
    and step hooks, ``zero_grad``, ``add_param_group`` and LR schedulers work as before.
    Pass ``foreach=True`` (or ``fused=True``) for torch's multi-tensor kernels: as in
    torch, the default for DTensor parameters is the per-parameter loop. Calling it
    again on the same optimizer does nothing.

    Raises:
        TypeError: ``optimizer`` is not SGD, Adam or AdamW, or overrides ``step``.
        ValueError: a group has ``differentiable=True``, the optimizer has an option the
            local step does not know, or ``optimizer.step`` is already wrapped (an LR
            scheduler built before this call).

    Example::

        >>> opt = step_on_local_shards(torch.optim.AdamW(model.parameters(), foreach=True))
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> loss.backward(); opt.step(); sched.step(); opt.zero_grad()
    """
    step, options = _implementation(optimizer)
    unknown = sorted(set(optimizer.defaults) - options)
    if unknown:
        raise ValueError(
            f"step_on_local_shards: {type(optimizer).__name__} has option(s) {unknown} that "
            f"the local step does not know (a newer torch?); keep torch's own step"
        )
    installed = vars(optimizer).get("step")
    if installed is not None:
        if getattr(installed, _MARK, False):
            return optimizer
        raise ValueError(
            "step_on_local_shards: optimizer.step is already wrapped by something else (an "
            "LR scheduler wraps it when it is built); call step_on_local_shards on the "
            "optimizer first, then build the scheduler"
        )
    for index, group in enumerate(optimizer.param_groups):
        _refuse_differentiable(group, index)
    # An instance attribute, so only this optimizer changes; torch's own wrapper runs the
    # step pre- and post-hooks and the profiler label around it, as for a class's step.
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    return optimizer


def _adam_step(optimizer: Adam, closure: _Closure = None) -> Any:
    """``torch.optim.Adam.step`` (AdamW's too) with local tensors in the functional's lists."""
    _graph_capture_health_check(optimizer)
    loss = _evaluate(closure)
    with torch.no_grad():
        for index, group in enumerate(optimizer.param_groups):
            _refuse_differentiable(group, index)
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            max_exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            # torch's own lazy state initialization and checks (private, since 2.0).
            has_complex = optimizer._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
            )
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam(
                local_tensors(params),
                local_tensors_like(grads, params, "grad"),
                local_tensors_like(exp_avgs, params, "exp_avg"),
                local_tensors_like(exp_avg_sqs, params, "exp_avg_sq"),
                local_tensors_like(max_exp_avg_sqs, params, "max_exp_avg_sq"),
                steps,
                foreach=_foreach(group, params),
                capturable=group["capturable"],
                differentiable=False,
                fused=group["fused"],
                grad_scale=getattr(optimizer, "grad_scale", None),
                found_inf=getattr(optimizer, "found_inf", None),
                has_complex=has_complex,
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
    return loss


def _sgd_step(optimizer: SGD, closure: _Closure = None) -> Any:
    """``torch.optim.SGD.step`` with local tensors in the functional's lists."""
    loss = _evaluate(closure)
    with torch.no_grad():
        for index, group in enumerate(optimizer.param_groups):
            _refuse_differentiable(group, index)
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor | None] = []
            has_sparse_grad = optimizer._init_group(group, params, grads, buffers)
            if not params:
                continue
            local_buffers: list[torch.Tensor | None] = [
                None if b is None else local_tensor_like(b, p, "momentum_buffer")
                for b, p in zip(buffers, params)
            ]
            sgd(
                local_tensors(params),
                local_tensors_like(grads, params, "grad"),
                local_buffers,
                has_sparse_grad=has_sparse_grad,
                foreach=_foreach(group, params),
                fused=group["fused"],
                grad_scale=getattr(optimizer, "grad_scale", None),
                found_inf=getattr(optimizer, "found_inf", None),
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                # torch creates a buffer from the gradient at a parameter's first step
                # (``grad.clone()``: a DTensor in the gradient's layout) and updates it in
                # place after that; only the new ones need storing.
                for p, g, before, after in zip(params, grads, buffers, local_buffers):
                    if before is None and after is not None:
                        optimizer.state[p]["momentum_buffer"] = wrap_like(after, g)
    return loss


def _implementation(optimizer: Optimizer) -> tuple[Callable[..., Any], frozenset[str]]:
    """The local step for ``optimizer`` and the options it knows, or TypeError."""
    own = inspect.unwrap(type(optimizer).step)
    if isinstance(optimizer, Adam) and own is inspect.unwrap(Adam.step):
        return _HOOKED_ADAM_STEP, _ADAM_OPTIONS
    if isinstance(optimizer, SGD) and own is inspect.unwrap(SGD.step):
        return _HOOKED_SGD_STEP, _SGD_OPTIONS
    raise TypeError(
        f"step_on_local_shards takes torch.optim.SGD, Adam or AdamW with torch's own step; "
        f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
    )


def _refuse_differentiable(group: dict[str, Any], index: int) -> None:
    if group.get("differentiable"):
        raise ValueError(
            f"step_on_local_shards: parameter group {index} has differentiable=True, which "
            f"the local step does not support (its update is not recorded for autograd); "
            f"use torch's own step for a differentiable optimizer"
        )


def _foreach(group: dict[str, Any], params: list[torch.Tensor]) -> bool | None:
    """The group's ``foreach``, with torch's default resolved as torch resolves it here.

    Left to the default, torch picks foreach only when every parameter is a plain tensor
    on a foreach device (``torch.optim.optimizer._default_to_fused_or_foreach``), so a
    group holding a DTensor gets the per-parameter loop. Given the local tensors, which
    are plain, it would pick foreach on a GPU: say so explicitly.
    """
    foreach: bool | None = group["foreach"]
    if foreach is None and group["fused"] is None and any(isinstance(p, DTensor) for p in params):
        return False
    return foreach


def _evaluate(closure: _Closure) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _graph_capture_health_check(optimizer: Optimizer) -> None:
    """What ``Adam.step`` checks first: CUDA-graph capture needs ``capturable=True``.

    A private method of torch's Optimizer (named ``_cuda_graph_capture_health_check``
    in older torch, where this skips it).
    """
    check = getattr(type(optimizer), "_accelerator_graph_capture_health_check", None)
    if check is not None:
        check(optimizer)


def _hooked(step: Callable[..., Any]) -> Callable[..., Any]:
    wrapped = Optimizer.profile_hook_step(step)
    setattr(wrapped, _MARK, True)
    return wrapped


_HOOKED_ADAM_STEP = _hooked(_adam_step)
_HOOKED_SGD_STEP = _hooked(_sgd_step)
