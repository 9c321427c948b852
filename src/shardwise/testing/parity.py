"""Compare a tensor-parallel module with its single-process reference.

Both copies start from identical weights (the reference is built, then deep-copied and
parallelized). For each step the helper feeds the same global input, compares the
outputs, the input gradient, every parameter gradient (gathered from its shards) and,
after an optimizer step, every parameter.

Runs inside each rank (see :class:`~shardwise.testing.pool.RankPool`); every rank
computes the reference itself, so nothing but the TP model communicates.

Example::

    >>> report = check_parity(lambda: MLP(16), PairwiseParallel(), mesh,
    ...                       lambda step: torch.randn(4, 16))
    >>> report.steps
    3
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from ..api import Plan, parallelize_module
from .tolerance import assert_close_at_scale, largest_magnitude, tolerance

__all__ = ["ParityReport", "check_parity", "expect_raises", "full", "mesh_of"]


@cache
def mesh_of(*shape: int, names: tuple[str, ...] | None = None) -> DeviceMesh:
    """A cached CPU mesh of ``shape`` over the current process group.

    Example::

        >>> mesh_of(2, 2, names=("dp", "tp"))
    """
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The global value of ``t`` (gathered if it is a DTensor).

    Example::

        >>> full(model.fc1.weight.grad).shape
        torch.Size([32, 16])
    """
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


@dataclass
class ParityReport:
    """What :func:`check_parity` compared (so tests can assert it really compared)."""

    steps: int = 0
    outputs: int = 0
    grads: int = 0
    params: int = 0
    max_diff: float = 0.0
    names: list[str] = field(default_factory=list)


def _close(
    report: ParityReport,
    what: str,
    actual: Any,
    expected: Any,
    atol: float | None,
    rtol: float | None,
    *,
    tol: float = 0.0,
    scale: float = 0.0,
) -> None:
    """Compare with the given ``atol``/``rtol``, or else ``tol`` relative to ``scale``."""
    if actual is None and expected is None:
        return
    if actual is None or expected is None:
        raise AssertionError(f"{what}: one side is None (tp={actual is None}, ref={expected is None})")
    if atol is None and rtol is None:
        diff = assert_close_at_scale(actual, expected, tol=tol, scale=scale, what=what)
    else:
        torch.testing.assert_close(
            actual, expected, atol=atol or 0.0, rtol=rtol or 0.0, msg=lambda m: f"{what}: {m}"
        )
        diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    report.max_diff = max(report.max_diff, diff)


def _longest_reduction(model: nn.Module, x: torch.Tensor) -> int:
    """The longest sum a step of ``model`` on ``x`` does: a weight's dimension, or the
    tokens a weight gradient sums over (every element of ``x`` but its last dimension)."""
    dims = [d for p in model.parameters() for d in p.shape]
    tokens = x.numel() // x.shape[-1] if x.dim() else 1
    return max([tokens, *dims])


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def check_parity(
    build: Callable[[], nn.Module],
    plan: Plan,
    mesh: DeviceMesh,
    make_input: Callable[[int], torch.Tensor],
    *,
    steps: int = 3,
    tp_mesh_dim: int = 0,
    sequence_dim: int | None = None,
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> ParityReport:
    """Check outputs, input and parameter gradients, and ``steps`` optimizer steps.

    Args:
        build: returns a fresh single-device module (called once, under ``seed``).
        plan: the parallelize plan applied to a deep copy of it.
        mesh: the mesh for :func:`~shardwise.parallelize_module`.
        make_input: returns the global input for a step (same on every rank).
        sequence_dim: if given, each rank feeds its chunk of the input along this
            dimension and must return its chunk of the reference output (sequence
            parallel); the reference loss is the sum over all chunks.
        call: how to call a module on an input (default ``module(x)``).
        optimizer: builds the optimizer from parameters (default SGD, lr 0.05, momentum 0.9).
        atol, rtol: fixed element-wise tolerances. Without them, each phase (output, input
            gradient, parameter gradients, parameters) is compared with
            :func:`~shardwise.testing.tolerance.tolerance` of the parameters' dtype, the
            longest reduction of the step and the steps so far, relative to the largest
            magnitude in that phase, so the bound follows the arithmetic, not one CPU.

    Example::

        >>> check_parity(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
        ...              PairwiseParallel(), mesh, lambda step: torch.randn(2, 8))
    """
    torch.manual_seed(seed)
    ref = build()
    tp = parallelize_module(copy.deepcopy(ref), mesh, plan, tp_mesh_dim=tp_mesh_dim)
    make_opt = optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    opt_ref, opt_tp = make_opt(ref.parameters()), make_opt(tp.parameters())
    invoke = call or (lambda m, x: m(x))
    tp_params = dict(tp.named_parameters())
    report = ParityReport(names=sorted(tp_params))
    missing = set(dict(ref.named_parameters())) - set(tp_params)
    if missing:
        raise AssertionError(f"parameters missing after parallelization: {sorted(missing)}")
    rank = dist.get_rank(mesh.get_group(tp_mesh_dim)) if dist.is_initialized() else 0
    world = mesh.size(tp_mesh_dim)

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t if sequence_dim is None else t.chunk(world, dim=sequence_dim)[rank]

    dtype = next((p.dtype for p in ref.parameters() if p.is_floating_point()), torch.float32)
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        x = make_input(step)
        tol = tolerance(dtype, reduction=_longest_reduction(ref, x), steps=step + 1)
        x_ref = x.detach().clone().requires_grad_(x.is_floating_point())
        x_tp = mine(x.detach()).clone().requires_grad_(x.is_floating_point())
        out_ref = _first(invoke(ref, x_ref))
        out_tp = full(_first(invoke(tp, x_tp)))
        assert out_tp is not None
        expected = mine(out_ref.detach())
        _close(report, f"step {step} output", out_tp, expected, atol, rtol,
               tol=tol, scale=largest_magnitude([out_ref]))
        report.outputs += 1
        weight = torch.randn(out_ref.shape, generator=gen)
        (out_ref * weight).sum().backward()
        (out_tp * mine(weight)).sum().backward()
        if x.is_floating_point():
            assert x_ref.grad is not None
            _close(report, f"step {step} input grad", x_tp.grad, mine(x_ref.grad), atol, rtol,
                   tol=tol, scale=largest_magnitude([x_ref.grad]))
        grad_scale = largest_magnitude(p.grad for p in ref.parameters())
        for name, p_ref in ref.named_parameters():
            _close(report, f"step {step} grad of {name}", full(tp_params[name].grad), p_ref.grad,
                   atol, rtol, tol=tol, scale=grad_scale)
            report.grads += 1
        opt_ref.step()
        opt_tp.step()
        opt_ref.zero_grad()
        opt_tp.zero_grad()
        param_scale = largest_magnitude(ref.parameters())
        for name, p_ref in ref.named_parameters():
            _close(report, f"step {step} param {name}", full(tp_params[name].detach()), p_ref.detach(),
                   atol, rtol, tol=tol, scale=param_scale)
            report.params += 1
        report.steps += 1
    return report


def expect_raises(
    exc_types: type[BaseException] | tuple[type[BaseException], ...],
    fn: Callable[..., Any],
    *args: Any,
    match: str | None = None,
    **kwargs: Any,
) -> str:
    """Call ``fn`` and return the message of the exception it must raise.

    Example::

        >>> msg = expect_raises(ValueError, parallelize_module, m, mesh, bad_plan, match="divisible")
    """
    import re

    try:
        fn(*args, **kwargs)
    except exc_types as exc:
        message = str(exc)
        if match is not None and not re.search(match, message):
            raise AssertionError(
                f"{type(exc).__name__} raised, but {match!r} not in: {message}"
            ) from exc
        return message
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc_types}")
