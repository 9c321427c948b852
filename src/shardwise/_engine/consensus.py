"""The same outcome on every rank: collective helpers for work that may fail on some ranks.

A rank that raises while its peers enter a collective leaves them waiting forever. The
helpers here exchange each rank's outcome first (one small collective), so a failure
anywhere raises on every rank, with the ranks that failed named. Without a process group
they act on the one process.

Example::

    >>> problem = None
    >>> try:
    ...     check_my_files()
    ... except Exception as exc:
    ...     problem = exc
    >>> agree("load('ckpt')", problem)   # raises on every rank if any rank failed
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["agree", "on_rank0", "rank", "world"]


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """The default group's size (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


_RAISED_AS_IS = (FileNotFoundError, RuntimeError, TypeError)  # anything else: RuntimeError


def agree(what: str, problem: Exception | None, token: Any = None) -> list[Any]:
    """Exchange each rank's outcome (one small all-gather); raise on every rank if any failed.

    Returns every rank's ``token`` when none failed. When all ranks failed alike, the
    error keeps its type (``FileNotFoundError``...); otherwise a ``RuntimeError`` names
    each failing rank. No rank returns early, so none is left waiting in a collective.
    """
    report = None if problem is None else (type(problem).__name__, str(problem).rstrip("."))
    if dist.is_initialized():
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (report, token))
    else:
        outcomes = [(report, token)]
    failed = {r: rep for r, (rep, _) in enumerate(outcomes) if rep is not None}
    if not failed:
        return [tok for _, tok in outcomes]
    distinct = set(failed.values())
    if len(failed) == len(outcomes) and len(distinct) == 1:
        kind, message = distinct.pop()
        cls = next((c for c in _RAISED_AS_IS if c.__name__ == kind), RuntimeError)
        raise cls(f"{what}: {message}.") from problem
    groups: dict[tuple[str, str], list[int]] = {}
    for r, rep in failed.items():
        groups.setdefault(rep, []).append(r)
    parts = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {message}"
        for (_, message), rs in groups.items()
    )
    scope = (
        "every rank" if len(failed) == len(outcomes) else f"{len(failed)} of {len(outcomes)} ranks"
    )
    raise RuntimeError(f"{what} failed on {scope}, so on all: {parts}.") from problem


def on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0; every rank returns after it, or raises if it failed.

    Rank 0 broadcasts its outcome, so a failure there cannot leave the others waiting
    in a barrier, and a non-zero rank never returns before rank 0 finished ``fn``.
    """
    failure: BaseException | None = None
    if rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the others know
            failure = exc
    if dist.is_initialized():
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)
        if failure is None and outcome[0] is not None:
            raise RuntimeError(f"rank 0 failed to write the checkpoint: {outcome[0]}")
    if failure is not None:
        raise failure
