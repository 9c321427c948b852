"""How far two correct floating-point results may differ, from the dtype and the computation.

One model, used by :func:`shardwise.verify` and by the test kit (:mod:`shardwise.testing`).

A tensor-parallel run and its single-process reference do the same arithmetic in another
order: a matmul's reduction is split into per-rank partial sums and added by a collective,
and a CPU's kernels pick their own blocking. Summing ``k`` terms in another order changes
the result by at most about ``k * eps`` times the sum of the terms' magnitudes (Higham,
*Accuracy and Stability of Numerical Algorithms*, §4.2). Half-precision matmuls accumulate
in float32 (on CPUs and GPUs alike), so there the sum's reordering costs float32's ``eps``
per term, and what the half type adds is the rounding of each result and of the partial
sums a collective adds in that type: a few of its ``eps``, whatever ``k``. Each optimizer
step carries the previous step's differences forward. Hence

    ``tolerance = steps * (eps(accumulation) * reduction + ROUNDINGS * eps(dtype))``

relative to the **scale of the computation**, not to each element: an element that cancels
to nearly zero (a gradient that is zero in exact arithmetic, such as an attention key bias)
carries the rounding error of the large terms it was summed from, and an element-wise
relative bound would call that a mismatch on one CPU and not on another. A comparison
allows ``|actual - expected| <= atol + tol * (|expected| + scale)`` element by element,
``scale`` being a largest magnitude the caller chooses (the phase's, in the test kit).

Example::

    >>> tol = tolerance(torch.float32, reduction=128, steps=2)   # 3.24e-05
    >>> assert_close_at_scale(tp_grad, ref_grad, tol=tol, scale=largest_grad, what="fc1 grad")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "ROUNDINGS",
    "Excess",
    "assert_close_at_scale",
    "excess",
    "largest_magnitude",
    "tolerance",
]

# Roundings in the computation's own dtype that one result may carry: its own, and the
# partial sums a collective adds in that dtype (up to 8 ranks' worth).
ROUNDINGS = 8


def tolerance(dtype: torch.dtype, *, reduction: int, steps: int = 1) -> float:
    """The relative difference allowed between two orderings of the same computation.

    Args:
        dtype: the floating-point type the computation runs in.
        reduction: the longest sum in it (a matmul's inner dimension, or the tokens a
            weight gradient sums over).
        steps: how many dependent steps (optimizer steps) the differences accumulate over.

    Example::

        >>> tolerance(torch.float32, reduction=64)       # eps * (64 + 8)
        8.58e-06
        >>> tolerance(torch.bfloat16, reduction=4096)    # accumulates in float32
        0.0630
    """
    if not dtype.is_floating_point:
        return 0.0
    accumulation = torch.float32 if torch.finfo(dtype).bits <= 16 else dtype
    per_step = torch.finfo(accumulation).eps * max(reduction, 1)
    per_step += ROUNDINGS * torch.finfo(dtype).eps
    return per_step * max(steps, 1)


def largest_magnitude(tensors: Iterable[torch.Tensor | None]) -> float:
    """The largest finite absolute value among floating-point ``tensors`` (0 if none).

    Example::

        >>> largest_magnitude([torch.tensor([1.0, -3.0]), None, torch.tensor([float("inf")])])
        3.0
    """
    best = 0.0
    for t in tensors:
        if t is not None and t.is_floating_point() and t.numel():
            best = max(best, t.detach().abs().nan_to_num(nan=0.0, posinf=0.0).max().item())
    return best


@dataclass(frozen=True)
class Excess:
    """The worst element of a comparison: its difference, the bound there, and where."""

    diff: float  # |actual - expected| at the worst element (inf for NaN against a number)
    bound: float  # what the bound allowed there
    index: tuple[int, ...]  # the worst element: the one furthest over its bound, if any
    actual: float
    expected: float
    largest: float  # the largest |actual - expected| anywhere

    @property
    def ok(self) -> bool:
        """Every element within its bound."""
        return self.diff <= self.bound


def excess(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    tol: float,
    scale: float,
    atol: float = 0.0,
    equal_nan: bool = False,
) -> Excess:
    """Compare element-wise against ``atol + tol * (|expected| + scale)``; the worst element.

    Equal infinities match, and NaN matches NaN with ``equal_nan``; otherwise a NaN or an
    infinity against a number is an infinite difference. Shapes must agree.

    Example::

        >>> excess(torch.ones(2), torch.ones(2), tol=1e-6, scale=1.0).ok
        True
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not actual.numel():
        return Excess(0.0, 0.0, (), 0.0, 0.0, 0.0)
    a, e = actual.detach().double(), expected.detach().double()
    same = (a == e) | (a.isnan() & e.isnan()) if equal_nan else a == e
    diff = torch.where(same, torch.zeros_like(a), (a - e).abs().nan_to_num(nan=float("inf")))
    bound = atol + tol * (e.abs().nan_to_num(nan=0.0, posinf=0.0) + scale)
    over = diff - bound
    worst = int(over.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    if over.flatten()[worst] <= 0:  # all within: report the largest difference itself
        worst = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    return Excess(
        float(diff.flatten()[worst]),
        float(bound.flatten()[worst]),
        index,
        float(a.flatten()[worst]),
        float(e.flatten()[worst]),
        float(diff.max()),
    )


def assert_close_at_scale(
    actual: torch.Tensor, expected: torch.Tensor, *, tol: float, scale: float, what: str
) -> float:
    """Assert ``|actual - expected| <= tol * (|expected| + scale)`` element-wise.

    Returns the largest absolute difference. The message names ``what``, the worst
    element and the bound it broke.

    Example::

        >>> assert_close_at_scale(tp.grad, ref.grad, tol=3e-5, scale=2.0, what="fc1.weight grad")
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != expected {expected.dtype}")
    if not actual.numel():
        return 0.0
    if not actual.dtype.is_floating_point:
        if not torch.equal(actual, expected):
            raise AssertionError(f"{what}: integer tensors differ")
        return 0.0
    found = excess(actual, expected, tol=tol, scale=scale)
    if not found.ok:
        raise AssertionError(
            f"{what}: differs by {found.diff:.3g} at index {found.index} (actual "
            f"{found.actual:.6g}, expected {found.expected:.6g}); allowed {found.bound:.3g} = "
            f"{tol:.3g} x (|expected| + scale {scale:.3g})"
        )
    return found.largest
