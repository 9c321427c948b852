"""How far two correct floating-point results may differ, from the dtype and the computation.

A tensor-parallel run and its single-process reference do the same arithmetic in another
order: a matmul's reduction is split into per-rank partial sums and added by a collective,
and a CPU's kernels pick their own blocking. Summing ``k`` terms in another order changes
the result by at most about ``k * eps`` times the sum of the terms' magnitudes (Higham,
*Accuracy and Stability of Numerical Algorithms*, §4.2), and each optimizer step carries the
previous step's differences forward.

So the tolerance here is ``eps(dtype) * reduction * steps``, relative to the **scale of the
computation** (the largest magnitude among the tensors compared in that phase), not to each
element: an element that cancels to nearly zero (a gradient that is zero in exact
arithmetic, such as an attention key bias) carries the rounding error of the large terms it
was summed from, and an element-wise relative tolerance would call that a mismatch on one
CPU and not on another.

Example::

    >>> tol = tolerance(torch.float32, reduction=128, steps=2)   # 3.05e-05
    >>> assert_close_at_scale(tp_grad, ref_grad, tol=tol, scale=largest_grad, what="fc1 grad")
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["assert_close_at_scale", "largest_magnitude", "tolerance"]


def tolerance(dtype: torch.dtype, *, reduction: int, steps: int = 1) -> float:
    """The relative difference allowed between two orderings of the same computation.

    Args:
        dtype: the floating-point type the computation runs in.
        reduction: the longest sum in it (a matmul's inner dimension, or the tokens a
            weight gradient sums over).
        steps: how many dependent steps (optimizer steps) the differences accumulate over.

    Example::

        >>> tolerance(torch.bfloat16, reduction=64)
        0.5
    """
    if not dtype.is_floating_point:
        return 0.0
    return torch.finfo(dtype).eps * max(reduction, 1) * max(steps, 1)


def largest_magnitude(tensors: Iterable[torch.Tensor | None]) -> float:
    """The largest absolute value among ``tensors`` (0 for none or empty ones)."""
    return max((t.detach().abs().max().item() for t in tensors if t is not None and t.numel()), default=0.0)


def assert_close_at_scale(
    actual: torch.Tensor, expected: torch.Tensor, *, tol: float, scale: float, what: str
) -> float:
    """Assert ``|actual - expected| <= tol * (|expected| + scale)`` element-wise.

    Returns the largest absolute difference. The message names ``what``, the worst
    element and the bound it broke.
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
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    bound = tol * (e.abs() + scale)
    over = torch.nan_to_num(diff - bound, nan=float("inf"))
    worst = int(over.argmax())
    if over.flatten()[worst] > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{what}: differs by {diff.flatten()[worst].item():.3g} at index {index} "
            f"(actual {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}); "
            f"allowed {bound.flatten()[worst].item():.3g} = {tol:.3g} x (|expected| + scale {scale:.3g})"
        )
    return float(diff.max().item())
