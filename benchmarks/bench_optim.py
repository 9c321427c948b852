"""One optimizer step over a GPT stack's parameters: DTensors, their local shards, plain tensors.

Run (2 CPU processes, gloo; the step itself does not communicate):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_optim.py

The parameters are those of ``benchmarks/bench_gpt.py``'s 2-block GPT stack, parallelized
by shardwise (q/k/v/o/up/down weights and biases are DTensors, the LayerNorms plain), with
the gradients of one backward pass, kept for every step. Each optimizer (torch's, ``foreach=True``) steps three
copies of them:

* ``torch_dtensor``: torch's own step on the DTensor parameters (split into DTensor and
  plain groups with ``shardwise.foreach_param_groups``, which foreach needs);
* ``local_step``: the same optimizer with ``shardwise.optim.step_on_local_shards``;
* ``torch_plain``: torch's own step on plain tensors of the local shapes (what a
  hand-written Megatron model holds), one group.

Rounds run the three in a freshly shuffled order; each rank's rounds are its own
samples and the medians pool every rank's rounds. Ratios of medians come with a 90%
bootstrap interval (whole rounds resampled). Writes ``benchmarks/results/optim.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import shardwise
from shardwise.optim import step_on_local_shards
from shardwise.testing.models import GPTStack, gpt_block_plan

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("torch_dtensor", "local_step", "torch_plain")
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    # bench_gpt.py's optimizer: plain SGD.
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-4, foreach=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True),
}


def parallel_copy(reference: nn.Module, mesh, x: torch.Tensor) -> list[nn.Parameter]:
    """A shardwise-parallelized copy's parameters, with gradients from one backward pass
    (so they are handed over as shardwise hands them over)."""
    model = shardwise.parallelize_module(copy.deepcopy(reference), mesh, {"blocks.*": gpt_block_plan()})
    model(x).pow(2).mean().backward()
    return list(model.parameters())


def plain_copy(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Plain tensors of the local shapes and values, gradients included (a hand-written model)."""
    out = []
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        q = nn.Parameter(local.detach().clone())
        assert p.grad is not None
        q.grad = (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
        out.append(q)
    return out


def make_steps(reference: nn.Module, mesh, x: torch.Tensor, name: str) -> dict[str, Callable[[], Any]]:
    make = OPTIMIZERS[name]
    dtensor, local = parallel_copy(reference, mesh, x), parallel_copy(reference, mesh, x)
    opts = {
        "torch_dtensor": make(shardwise.foreach_param_groups(dtensor)),
        "local_step": step_on_local_shards(make(local)),
        "torch_plain": make(plain_copy(dtensor)),
    }
    for opt in opts.values():  # state exists from here on
        opt.step()
    return {n: opts[n].step for n in VARIANTS}


def ratio(a: list[float], b: list[float], seed: int) -> dict[str, float]:
    """median(a) / median(b), with a 90% bootstrap interval over the rounds."""
    rng = random.Random(seed)
    boot = []
    for _ in range(1000):
        idx = rng.choices(range(len(a)), k=len(a))
        boot.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    cuts = statistics.quantiles(boot, n=20)
    return {"ratio": statistics.median(a) / statistics.median(b), "lo": cuts[0], "hi": cuts[-1]}


def bench(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int, seed: int) -> dict[str, Any]:
    gc.collect()
    gc.freeze()
    mine = []
    for i in range(rounds + warmup):
        times = {}
        for v in random.Random(i).sample(VARIANTS, len(VARIANTS)):
            t0 = time.perf_counter()
            steps[v]()
            times[v] = time.perf_counter() - t0
        if i >= warmup:
            mine.append([times[v] for v in VARIANTS])
    gc.unfreeze()
    local = torch.tensor(mine, dtype=torch.float64)  # [round, variant]
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    pooled = torch.cat(every)
    s = {v: pooled[:, j].tolist() for j, v in enumerate(VARIANTS)}
    return {
        "median_s": {v: statistics.median(t) for v, t in s.items()},
        "local_step_over_torch_plain": ratio(s["local_step"], s["torch_plain"], seed),
        "torch_dtensor_over_torch_plain": ratio(s["torch_dtensor"], s["torch_plain"], seed),
        "local_step_over_torch_dtensor": ratio(s["local_step"], s["torch_dtensor"], seed),
        "rounds_per_rank": rounds,
    }


def _fmt(r: dict[str, float]) -> str:
    return f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        reference = GPTStack(hidden, max(2, hidden // 64), args.depth)
        x = torch.randn(args.seq, args.batch, hidden)
        params = parallel_copy(reference, mesh, x)
        n_dtensor = sum(isinstance(p, DTensor) for p in params)
        for name in OPTIMIZERS:
            steps = make_steps(reference, mesh, x, name)
            row = {"hidden": hidden, "optimizer": name, "dtensor_params": n_dtensor,
                   "plain_params": len(params) - n_dtensor,
                   **bench(steps, args.rounds, args.warmup, seed=hidden)}
            rows.append(row)
            if dist.get_rank() == 0:
                m = row["median_s"]
                print(
                    f"hidden {hidden:4d} {name:12s}: torch on DTensors {m['torch_dtensor'] * 1e6:7.1f} us  "
                    f"local step {m['local_step'] * 1e6:7.1f} us  torch on plain {m['torch_plain'] * 1e6:7.1f} us | "
                    f"local/plain {_fmt(row['local_step_over_torch_plain'])}  "
                    f"DTensor/plain {_fmt(row['torch_dtensor_over_torch_plain'])}  "
                    f"local/DTensor {_fmt(row['local_step_over_torch_dtensor'])}",
                    flush=True,
                )
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"world_size": dist.get_world_size(), "torch": torch.__version__, "depth": args.depth,
                "threads_per_process": 1, "foreach": True}
        (args.out / "optim.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out / 'optim.json'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
