"""GPT-block training step: shardwise vs torch's tensor parallelism vs hand-written Megatron.

Run (2 CPU processes, gloo):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_gpt.py

Builds the same 2-block GPT stack (separate q/k/v/o/up/down Linears, seed-style plan:
Colwise q/k/v/up, Rowwise o/down) four ways from identical weights: shardwise, PyTorch's
``torch.distributed.tensor.parallel`` (the peer; imported only here), a hand-written
Megatron-style model with local shards, and an unsharded model run by each process alone
(for the TP speedup). A step is forward + backward + torch's SGD (``foreach=True``):
shardwise's with ``shardwise.optim.step_on_local_shards`` (torch's update on the local
shards), torch TP's with torch's own step on its DTensors, the plain-tensor models with
torch's own step. Steps of all four are interleaved in one run, in a freshly shuffled
order every round, so that machine noise and cache effects hit them alike. A step's time is its slower rank's; the median step time of each variant
is reported, and each ratio of medians comes with a 90% bootstrap interval (resampling
whole rounds) to show how far the run's noise could move it.
Writes ``benchmarks/results/gpt.json`` and ``gpt.png``.

It also measures what shardwise adds to a step on the host, apart from the network:
shardwise and the hand-written model run again with ``dist.all_reduce`` replaced by a
no-op (their only collective under this plan), each rank on its own, and the medians of
forward, backward and optimizer time are compared phase by phase (``--no-host-overhead``
skips this).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(__file__))
from megatron_baseline import MegatronGPTBlock, MegatronStack

import shardwise
from shardwise.optim import step_on_local_shards
from shardwise.testing.models import GPTStack, gpt_block_plan

RESULTS = Path(__file__).parent / "results"


def torch_tp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {f"blocks.*.{n}": col for n in ("q", "k", "v", "up")}
    plan.update({f"blocks.*.{n}": row for n in ("o", "down")})
    return parallelize_module(model, mesh, plan)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    # torch's SGD with foreach=True for every variant (torch's default turns foreach off
    # for DTensor params). shardwise steps its DTensors' local shards
    # (shardwise.optim.step_on_local_shards), which takes one group mixing DTensors and
    # plain tensors. torch's own step on torch TP's DTensors needs DTensor and plain
    # params in separate groups (a foreach op cannot mix them); for the plain-parameter
    # variants foreach_param_groups gives a single group.
    if name == "shardwise":
        return step_on_local_shards(torch.optim.SGD(model.parameters(), lr=1e-4, foreach=True))
    return torch.optim.SGD(shardwise.foreach_param_groups(model.parameters()), lr=1e-4, foreach=True)


def make_step(name: str, model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = make_optimizer(name, model)

    def step() -> None:
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_phased_step(name: str, model: nn.Module, x: torch.Tensor) -> Callable[[], list[float]]:
    """Like :func:`make_step`, returning the seconds of forward, backward and optimizer step."""
    opt = make_optimizer(name, model)

    def step() -> list[float]:
        t0 = time.perf_counter()
        loss = model(x).float().pow(2).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2]

    return step


def _no_collective(*args, **kwargs) -> None:
    return None


def host_overhead(
    variants: dict[str, nn.Module], x: torch.Tensor, iters: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median host seconds per phase of shardwise and hand-written steps, collectives stubbed.

    Under the benchmark's plan both models communicate only through ``dist.all_reduce``;
    replacing it with a no-op leaves the local work (the same matmuls) and each library's
    own bookkeeping. Ranks do not synchronize, so each rank's rounds are its own samples;
    the medians pool every rank's rounds. The weights drift apart (gradients are not
    summed), which does not change the work done.
    """
    names = ("shardwise", "hand_written")
    steps = {n: make_phased_step(n, variants[n], x) for n in names}
    rounds = []
    with mock.patch.object(dist, "all_reduce", _no_collective):
        for i in range(iters + warmup):
            times = {n: steps[n]() for n in random.Random(i).sample(names, len(names))}
            if i >= warmup:
                rounds.append([times[n] for n in names])
    mine = torch.tensor(rounds, dtype=torch.float64)  # [round, variant, phase]
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    pooled = torch.cat(every)
    out: dict[str, dict[str, float]] = {}
    for j, n in enumerate(names):
        phases = pooled[:, j, :]
        out[n] = {
            phase: statistics.median(phases[:, k].tolist())
            for k, phase in enumerate(("forward", "backward", "optimizer"))
        }
        out[n]["step"] = statistics.median(phases.sum(1).tolist())
    return out


def activation_bytes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes of distinct storages autograd saves for backward in one forward.

    ``total`` counts everything saved; ``layer_norm`` only what the LayerNorms save (their
    input, mean and rstd): the region sequence parallelism shrinks N-fold.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    norm: dict[int, int] = {}
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        if node.name() == "NativeLayerNormBackward0":
            for attr in ("_saved_input", "_saved_result1", "_saved_result2"):
                storage = getattr(node, attr).untyped_storage()
                norm[storage.data_ptr()] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    del out
    return {"total": sum(seen.values()), "layer_norm": sum(norm.values())}


def bench_hidden(hidden: int, args: argparse.Namespace, mesh, group) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    heads = max(2, hidden // 64)
    torch.manual_seed(0)
    reference = GPTStack(hidden, heads, args.depth)
    x = torch.randn(args.seq, args.batch, hidden)

    variants = {
        "shardwise": shardwise.parallelize_module(
            copy.deepcopy(reference), mesh, {"blocks.*": gpt_block_plan()}
        ),
        "torch_tp": torch_tp(copy.deepcopy(reference), mesh),
        "hand_written": MegatronStack(
            [MegatronGPTBlock(b, group) for b in copy.deepcopy(reference).blocks]
        ),
        "single_process": copy.deepcopy(reference),
    }
    with torch.no_grad():  # sanity: all four compute the same function
        want = reference(x)
        for name, model in variants.items():
            got = model(x)
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
                raise AssertionError(f"{name} disagrees with the reference at hidden={hidden}")
    steps = {name: make_step(name, model, x) for name, model in variants.items()}
    names = list(steps)
    iters = args.iters if hidden < 1024 else max(8, args.iters // 8)
    # Settle the heap, and move everything built so far out of the cyclic collector's
    # reach, so a full collection costs the same whichever variant happens to trigger it.
    gc.collect()
    gc.freeze()
    rounds = []
    for i in range(iters + args.warmup):
        # A fresh order each round (seeded, so every rank agrees) so that no variant always
        # follows the same one: a large predecessor evicts caches, and that must hit all
        # variants alike. (A rotation would not do: it keeps the cyclic neighbours.)
        times = {}
        for name in random.Random(i).sample(names, len(names)):
            step = steps[name]
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name] = time.perf_counter() - t0
        if i >= args.warmup:
            rounds.append([times[n] for n in names])
    gc.unfreeze()
    # A step takes as long as its slower rank.
    per_round = torch.tensor(rounds, dtype=torch.float64)
    dist.all_reduce(per_round, op=dist.ReduceOp.MAX)
    step_s = {n: per_round[:, j].tolist() for j, n in enumerate(names)}
    median = {n: statistics.median(t) for n, t in step_s.items()}

    def ratio(num: str, den: str) -> dict[str, float]:
        """median(num) / median(den), with a 90% bootstrap interval over the rounds."""
        a, b = step_s[num], step_s[den]
        rng = random.Random(hidden)
        boot = []
        for _ in range(1000):
            idx = rng.choices(range(len(a)), k=len(a))
            boot.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
        cuts = statistics.quantiles(boot, n=20)  # 5%, 10%, ..., 95%
        lo, hi = cuts[0], cuts[-1]
        return {"ratio": median[num] / median[den], "lo": lo, "hi": hi}

    host = None
    if args.host_overhead:
        # Fresh copies, so the drifting weights of the stubbed run touch nothing above.
        host = host_overhead(
            {
                "shardwise": shardwise.parallelize_module(
                    copy.deepcopy(reference), mesh, {"blocks.*": gpt_block_plan()}
                ),
                "hand_written": MegatronStack(
                    [MegatronGPTBlock(b, group) for b in copy.deepcopy(reference).blocks]
                ),
            },
            x,
            iters,
            args.warmup,
        )

    sp_model = shardwise.parallelize_module(
        copy.deepcopy(reference), mesh, {"blocks.*": gpt_block_plan(sequence_parallel=True)}
    )
    x_sp = x.chunk(world, 0)[rank].clone()
    memory = {
        "single_process": activation_bytes(variants["single_process"], x),
        "shardwise_tp": activation_bytes(variants["shardwise"], x),
        "shardwise_tp_sp": activation_bytes(sp_model, x_sp),
    }
    tokens = args.seq * args.batch
    return {
        "hidden": hidden,
        "heads": heads,
        "median_step_s": median,
        "tokens_per_s": {n: tokens / t for n, t in median.items()},
        "shardwise_over_hand_written": ratio("shardwise", "hand_written"),
        "shardwise_over_torch_tp": ratio("shardwise", "torch_tp"),
        # The same ratio for the hand-written code: what matching it would give.
        "hand_written_over_torch_tp": ratio("hand_written", "torch_tp"),
        "tp_speedup_over_one_process": ratio("single_process", "shardwise"),
        "activation_bytes_per_rank": memory,
        # Median host seconds per phase with all-reduce stubbed out (None if skipped).
        "host_s_without_collectives": host,
        "iters": iters,
        "step_s_per_round": step_s,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [r["hidden"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [
        ("shardwise_over_hand_written", "o-", "shardwise / hand-written"),
        ("shardwise_over_torch_tp", "s-", "shardwise / torch TP"),
        ("tp_speedup_over_one_process", "^-", "TP=2 speedup vs 1 process"),
    ]
    for key, fmt, label in series:
        med = [r[key]["ratio"] for r in rows]
        err = [
            [m - r[key]["lo"] for m, r in zip(med, rows)],
            [r[key]["hi"] - m for m, r in zip(med, rows)],
        ]
        ax.errorbar(hs, med, yerr=err, fmt=fmt, capsize=3, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden size")
    ax.set_ylabel("ratio of median step times (90% CI)")
    ax.set_title("GPT block train step, 2 gloo ranks, 1 thread each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(ratio: dict[str, float]) -> str:
    return f"{ratio['ratio']:.3f} [{ratio['lo']:.3f}, {ratio['hi']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-host-overhead",
        dest="host_overhead",
        action="store_false",
        help="skip the run with collectives stubbed out that measures host overhead",
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group()
    rows = []
    for hidden in args.hidden:
        row = bench_hidden(hidden, args, mesh, group)
        rows.append(row)
        if rank == 0:
            m = row["median_step_s"]
            print(
                f"hidden {hidden:5d}: shardwise {m['shardwise'] * 1e3:8.2f} ms  "
                f"torch TP {m['torch_tp'] * 1e3:8.2f} ms  hand-written {m['hand_written'] * 1e3:8.2f} ms  "
                f"1 process {m['single_process'] * 1e3:8.2f} ms | "
                f"sw/hand {_fmt(row['shardwise_over_hand_written'])}  "
                f"sw/torch {_fmt(row['shardwise_over_torch_tp'])} "
                f"(hand/torch {row['hand_written_over_torch_tp']['ratio']:.3f})  "
                f"TP speedup {_fmt(row['tp_speedup_over_one_process'])}  "
                f"tokens/s {row['tokens_per_s']['shardwise']:.0f}",
                flush=True,
            )
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "world_size": world,
            "torch": torch.__version__,
            "depth": args.depth,
            "batch": args.batch,
            "seq": args.seq,
            "threads_per_process": 1,
        }
        (args.out / "gpt.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
        plot(rows, args.out / "gpt.png")
        print("activation bytes per rank (saved for backward, one forward; LayerNorm part):")
        for r in rows:
            mem = r["activation_bytes_per_rank"]
            line = "  ".join(
                f"{label} {mem[key]['total'] / 2**20:7.2f} MiB ({mem[key]['layer_norm'] / 2**20:5.2f})"
                for label, key in (
                    ("1 process", "single_process"),
                    ("TP", "shardwise_tp"),
                    ("TP+SP", "shardwise_tp_sp"),
                )
            )
            print(f"  hidden {r['hidden']:5d}: {line}")
        if args.host_overhead:
            print("host time per step with all-reduce stubbed out (ms, median; shardwise - hand-written):")
            for r in rows:
                host = r["host_s_without_collectives"]
                sw, hw = host["shardwise"], host["hand_written"]
                line = "  ".join(
                    f"{phase} {sw[phase] * 1e3:7.2f} - {hw[phase] * 1e3:7.2f} = {(sw[phase] - hw[phase]) * 1e3:+6.2f}"
                    for phase in ("forward", "backward", "optimizer", "step")
                )
                print(f"  hidden {r['hidden']:5d}: {line}")
        print(f"wrote {args.out / 'gpt.json'} and {args.out / 'gpt.png'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
