"""``shardwise train``: train a character-level GPT with tensor parallelism on local CPU processes.

It starts ``--tp`` processes itself (gloo, no torchrun needed), parallelizes
:class:`~shardwise.cli.charlm.CharLM` with :func:`~shardwise.cli.charlm.plan`, and trains
it on the Python standard library's own sources, so nothing is downloaded. Every rank
sees the same batches (they form one TP group); rank 0 shows a progress bar, writes
``OUT/metrics.jsonl`` and ``OUT/loss.png``, and prints a generated sample at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``train`` to the ``shardwise`` command's subparsers."""
    p = commands.add_parser(
        "train",
        help="train a small transformer LM with tensor parallelism on local CPU processes",
        description="Train a character-level GPT with tensor parallelism on N local CPU "
        "processes (gloo; started here, no torchrun needed) on the Python standard "
        "library's own sources (no download). Vocabulary-parallel embedding and loss, "
        "Megatron column/row pairs in every block, AdamW. Shows loss and tokens/s, writes "
        "OUT/metrics.jsonl and OUT/loss.png, and prints a generated sample at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size: processes to start")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--out", default="runs/train", help="folder for metrics.jsonl and loss.png")
    p.add_argument("--seq", type=int, default=128, help="context length in characters")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (every rank sees all)")
    p.add_argument("--hidden", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads (divisible by --tp)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    p.add_argument(
        "--sample", type=int, default=300, help="characters to generate at the end (0: none)"
    )
    p.add_argument("--prompt", default="def ", help="start of the generated sample")
    p.add_argument(
        "--corpus", default=None, help="a text file or folder of .py files (default: the stdlib)"
    )
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> int:
    """Check the flags, start ``args.tp`` processes and train; 0 on success."""
    from torch.multiprocessing.spawn import ProcessRaisedException, start_processes

    problems = [
        f"--{name} must be positive"
        for name in ("tp", "steps", "seq", "batch", "hidden", "heads", "layers")
        if getattr(args, name) < 1
    ]
    if not problems and args.hidden % args.heads:
        problems.append(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if not problems and args.heads % args.tp:
        problems.append(
            f"--heads {args.heads} is not divisible by --tp {args.tp} (each rank takes whole heads)"
        )
    if problems:
        print("shardwise train: " + "; ".join(problems), file=sys.stderr)
        return 2
    config = dict(vars(args))
    config.pop("func", None)
    try:
        start_processes(
            _rank_main,
            args=(args.tp, _free_port(), config),
            nprocs=args.tp,
            join=True,
            start_method="spawn",
        )
    except ProcessRaisedException as exc:
        print(f"shardwise train failed:\n{exc}", file=sys.stderr)
        return 1
    return 0


def _rank_main(rank: int, world: int, port: int, cfg: dict[str, Any]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(rank, world, cfg)
    finally:
        dist.destroy_process_group()


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _train(rank: int, world: int, cfg: dict[str, Any]) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from tqdm import tqdm  # type: ignore[import-untyped]

    import shardwise

    from .charlm import CharLM, plan, stdlib_corpus

    lead = rank == 0
    mesh = init_device_mesh("cpu", (world,))
    data, source = stdlib_corpus(root=cfg["corpus"])
    seq, batch, steps = cfg["seq"], cfg["batch"], cfg["steps"]
    torch.manual_seed(cfg["seed"])
    single = CharLM(cfg["hidden"], cfg["heads"], cfg["layers"], seq)
    total = sum(p.numel() for p in single.parameters())
    model = shardwise.parallelize_module(single, mesh, plan())
    local = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        shardwise.foreach_param_groups(model.parameters()),
        lr=cfg["lr"],
        betas=(0.9, 0.95),
        weight_decay=0.01,
        foreach=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    out = Path(cfg["out"])
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"shardwise train: TP={world} on {world} CPU processes (gloo); {cfg['layers']} blocks, "
            f"hidden {cfg['hidden']}, {cfg['heads']} heads, {total / 1e6:.2f}M parameters "
            f"({local / 1e6:.2f}M on each rank); batch {batch} x {seq} characters; "
            f"corpus: {source}",
            flush=True,
        )
    batches = torch.Generator().manual_seed(cfg["seed"] + 1)  # the same batches on every rank
    history: list[dict[str, float]] = []
    bar = tqdm(
        range(steps),
        disable=not lead,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stdout,
    )
    start = window = time.perf_counter()
    window_tokens = 0
    with open(out / "metrics.jsonl", "w") if lead else open(os.devnull, "w") as log:
        for step in bar:
            starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=batches)
            chunk = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])  # [B, T+1]
            logits = model(chunk[:, :-1])  # DTensor [B, T, V] Shard(-1): this rank's vocabulary
            loss = shardwise.vocab_parallel_cross_entropy(logits, chunk[:, 1:])
            loss.backward()
            shardwise.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            value = loss.item()
            window_tokens += batch * seq
            now = time.perf_counter()
            if step % cfg["log_every"] == 0 or step == steps - 1:
                rate = window_tokens / max(now - window, 1e-9)
                row = {
                    "step": step,
                    "loss": round(value, 5),
                    "tokens_per_s": round(rate, 1),
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": round(now - start, 2),
                }
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:,.0f}")
                window, window_tokens = now, 0
    bar.close()
    sample = _generate(model, cfg, seq) if cfg["sample"] > 0 else ""
    if lead:
        _plot(history, out / "loss.png", f"shardwise train, TP={world}")
        first, last = history[0]["loss"], history[-1]["loss"]
        elapsed = time.perf_counter() - start
        print(
            f"loss {first:.3f} -> {last:.3f} over {steps} steps ({1 - last / first:.0%} lower) in "
            f"{elapsed:.0f} s, {steps * batch * seq / elapsed:,.0f} tokens/s; wrote "
            f"{out / 'metrics.jsonl'} and {out / 'loss.png'}"
        )
        if sample:
            print(f"sample:\n{sample}", flush=True)


def _generate(model: Any, cfg: dict[str, Any], seq: int) -> str:
    """Sample ``cfg['sample']`` characters after the prompt (every rank runs the model)."""
    import torch

    from .charlm import decode, encode

    model.eval()
    ids = encode(cfg["prompt"]).tolist() or [0]
    gen = torch.Generator().manual_seed(cfg["seed"] + 2)  # same draws on every rank
    with torch.no_grad():
        for _ in range(cfg["sample"]):
            logits = model(torch.tensor([ids[-seq:]])).full_tensor()[0, -1]  # [V], gathered
            probs = torch.softmax(logits / 0.8, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    return decode(ids)


def _plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set(xlabel="step", ylabel="training loss (nats/char)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
