"""What a fault test compares across ranks: each rank's outcome, and a group still usable after."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = 30  # seconds; a hang fails the test and restarts the pool


def group_works() -> float:
    """One all-reduce of ones over the default group: its world size if the group still works."""
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """("ok", "") or (exception type, message), then prove the group is still usable."""
    try:
        fn()
        result = ("ok", "")
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank saw
        result = (type(exc).__name__, str(exc))
    assert group_works() == dist.get_world_size()
    return result
