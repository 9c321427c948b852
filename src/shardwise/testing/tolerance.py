"""How far two correct floating-point results may differ: the one model shardwise uses.

It lives in :mod:`shardwise.diagnostics.tolerance` (so :func:`shardwise.verify` and the
test kit agree on what "equal" means); this module is its home in the test kit.

Example::

    >>> tol = tolerance(torch.float32, reduction=128, steps=2)
    >>> assert_close_at_scale(tp_grad, ref_grad, tol=tol, scale=largest_grad, what="fc1 grad")
"""

from ..diagnostics.tolerance import (
    ROUNDINGS,
    Excess,
    assert_close_at_scale,
    excess,
    largest_magnitude,
    tolerance,
)

__all__ = [
    "ROUNDINGS",
    "Excess",
    "assert_close_at_scale",
    "excess",
    "largest_magnitude",
    "tolerance",
]
