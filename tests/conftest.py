"""Session-scoped rank pools: one set of worker processes per world size, reused by every test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from shardwise.testing import RankPool


@pytest.fixture(scope="session")
def pools() -> Iterator[Callable[[int], RankPool]]:
    started: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in started:
            started[world_size] = RankPool(world_size)
        return started[world_size]

    yield get
    for pool in started.values():
        pool.close()
