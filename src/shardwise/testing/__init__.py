"""Test kit: run bodies on N gloo ranks and compare TP modules with a single-device reference.

Example::

    >>> from shardwise.testing import RankPool, check_parity
"""

from .parity import ParityReport, check_parity, expect_raises, full, mesh_of
from .pool import RankError, RankPool

__all__ = ["ParityReport", "RankError", "RankPool", "check_parity", "expect_raises", "full", "mesh_of"]
