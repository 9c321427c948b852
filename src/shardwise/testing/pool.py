"""A pool of gloo ranks that runs test bodies, reused across tests.

Starting a rank costs seconds (importing torch, joining a process group), so a pool
starts ``world_size`` processes once and then runs any number of functions on all of
them. A function is sent by reference (module and qualified name), so it must be
defined at module level; its arguments and return value travel by pickle.

A body that raises on some ranks raises :class:`RankError` here with every rank's
traceback. A body that does not finish within ``timeout`` seconds (a hang) kills the
pool and raises ``TimeoutError``; the next ``run`` starts fresh processes.

Example::

    >>> pool = RankPool(2)
    >>> pool.run(my_test_body, 16)        # -> [result_rank0, result_rank1]
    >>> pool.close()
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch.multiprocessing as mp

__all__ = ["RankError", "RankPool"]


class RankError(RuntimeError):
    """Raised when a body failed on one or more ranks; ``errors`` maps rank to traceback."""

    def __init__(self, errors: dict[int, tuple[str, str, str]]) -> None:
        self.errors = errors
        parts = [f"rank {r}: {t}: {m}\n{tb}" for r, (t, m, tb) in sorted(errors.items())]
        super().__init__(f"{len(errors)} rank(s) failed\n" + "\n".join(parts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(module: str, qualname: str, path: str | None) -> Callable[..., Any]:
    if module in sys.modules:
        obj: Any = sys.modules[module]
    else:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            if path is None:
                raise
            spec = importlib.util.spec_from_file_location(module, path)
            assert spec is not None and spec.loader is not None
            obj = importlib.util.module_from_spec(spec)
            sys.modules[module] = obj
            spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world: int, port: int, conn: Connection, path: list[str], backend: str) -> None:
    sys.path[:] = path
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        module, qualname, fpath, args, kwargs = msg
        try:
            fn = _load(module, qualname, fpath)
            torch.manual_seed(0)
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - report everything to the parent
            conn.send(("err", (type(exc).__name__, str(exc), traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` worker processes joined in one gloo process group.

    Example::

        >>> with RankPool(4) as pool:
        ...     ranks = pool.run(body)
    """

    def __init__(self, world_size: int, backend: str = "gloo", grace: float = 5.0) -> None:
        self.world_size = world_size
        self.grace = grace
        self.backend = backend
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(rank, self.world_size, port, child, list(sys.path), self.backend),
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Example::

            >>> pool.run(body, world_size=2)
        """
        if not self._procs:
            self._start()
        module = getattr(sys.modules.get(fn.__module__), "__file__", None)
        msg = (fn.__module__, fn.__qualname__, module, args, kwargs)
        for conn in self._conns:
            conn.send(msg)
        deadline = time.monotonic() + timeout
        results: list[Any] = [None] * self.world_size
        errors: dict[int, tuple[str, str, str]] = {}
        pending = set(range(self.world_size))
        while pending:
            for rank in sorted(pending):
                conn = self._conns[rank]
                if conn.poll():
                    status, value = conn.recv()
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = value
                    else:
                        errors[rank] = value
                        # Ranks still inside a collective with the failed one would wait
                        # for gloo's timeout: give them a moment, then restart the pool.
                        deadline = min(deadline, time.monotonic() + self.grace)
                elif not self._procs[rank].is_alive():
                    pending.discard(rank)
                    errors[rank] = ("ProcessDied", f"exit code {self._procs[rank].exitcode}", "")
            if pending and time.monotonic() > deadline:
                self.close(force=True)
                stuck = ", ".join(map(str, sorted(pending)))
                if errors:
                    errors.update({r: ("Stuck", "waiting on a failed rank; pool restarted", "")
                                   for r in pending})
                    raise RankError(errors)
                raise TimeoutError(
                    f"{fn.__qualname__} did not finish on rank(s) {stuck} within {timeout}s "
                    "(a hang); the pool was restarted."
                )
            if pending:
                time.sleep(0.002)
        if errors:
            raise RankError(errors)
        return results

    def close(self, force: bool = False) -> None:
        """Stop the workers (``force`` kills them without waiting).

        Example::

            >>> pool.close()
        """
        for conn, proc in zip(self._conns, self._procs):
            if not force and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self._procs:
            if force:
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._procs, self._conns = [], []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
