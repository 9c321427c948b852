"""What the checkpoint checksums cost next to the checkpoint's own I/O.

Saves and loads a TP-sharded model of about ``--mb`` MiB (fp32, plus AdamW state: three
times that on disk) on a gloo pool of ``--world`` ranks, and times, on each rank, the whole
``save_checkpoint`` / ``load_checkpoint`` and the part spent hashing (``digest_files`` on
save, ``check_files`` on load). A load with ``verify=False`` (sizes only) is the baseline.

    PYTHONPATH=src python benchmarks/checkpoint_checksums.py --world 2 --mb 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from shardwise import ColwiseParallel, RowwiseParallel, parallelize_module
from shardwise.checkpoint import integrity as _integrity
from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.testing import RankPool, mesh_of


def _model(world: int, mb: int) -> nn.Module:
    width = 2048
    layers = max(2, (mb << 20) // (4 * width * width) // 2 * 2)
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    plan = {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(layers)}
    return parallelize_module(model, mesh_of(world), plan)


def _timed(fn: Any, spent: list[float]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return wrapper


def _body(world: int, mb: int, directory: str, repeats: int) -> dict[str, float]:
    import torch.distributed as dist

    model = _model(world, mb)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    path = Path(directory) / "ckpt"
    out: dict[str, list[float]] = {
        k: [] for k in ("save", "save_hash", "load", "load_hash", "load_noverify")
    }
    for _ in range(repeats):
        spent: list[float] = []
        with mock.patch(
            "shardwise.checkpoint.digest_files", _timed(_integrity.digest_files, spent)
        ):
            dist.barrier()
            start = time.perf_counter()
            save_checkpoint(path, model, opt)
            out["save"].append(time.perf_counter() - start)
        out["save_hash"].append(sum(spent))
        spent = []
        with mock.patch("shardwise.checkpoint.check_files", _timed(_integrity.check_files, spent)):
            dist.barrier()
            start = time.perf_counter()
            load_checkpoint(path, model, opt)
            out["load"].append(time.perf_counter() - start)
        out["load_hash"].append(sum(spent))
        dist.barrier()
        start = time.perf_counter()
        load_checkpoint(path, model, opt, verify=False)
        out["load_noverify"].append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in path.iterdir())
    result = {k: min(v) for k, v in out.items()}
    result["bytes"] = float(size)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, RankPool(args.world) as pool:
        ranks = pool.run(_body, args.world, args.mb, directory, args.repeats, timeout=1800)
    size = ranks[0]["bytes"] / 2**20
    print(
        f"checkpoint: {size:.0f} MiB on disk (model + AdamW state), {args.world} ranks; best of {args.repeats}"
    )
    for rank, r in enumerate(ranks):
        print(
            f"rank {rank}: save {r['save']:.3f} s (hashing {r['save_hash']:.3f} s, "
            f"{100 * r['save_hash'] / r['save']:.0f}%); load {r['load']:.3f} s (verifying "
            f"{r['load_hash']:.3f} s, {100 * r['load_hash'] / r['load']:.0f}%); "
            f"load with verify=False {r['load_noverify']:.3f} s"
        )


if __name__ == "__main__":
    main()
