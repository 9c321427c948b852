"""Peak memory and time of loading a Hugging Face checkpoint at TP 2, per rank.

Run (spawns its own 2 gloo ranks; no torchrun needed):

    python benchmarks/bench_load.py [--dir /tmp/llama600] [--world 2]

Writes (once, in a separate process) a ~600 MB float32 Llama checkpoint with random
weights: hidden 1024, 8 layers, 16 heads / 4 KV heads, vocabulary 32000, untied head,
saved by transformers in 200 MB shards. Then loads it in bfloat16 at TP ``world``, each
way in fresh processes:

* ``shardwise.hf.from_pretrained``: built and parallelized on meta, each rank reading
  only its slices;
* the whole model first (``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` on
  every rank), then ``parallelize_module(model, mesh, "auto")``.

A thread samples the process's anonymous resident memory (``RssAnon`` in
``/proc/self/status``) every 0.5 ms; memory-mapped file pages (the page cache) are
shared and do not count. transformers' Llama code is imported before the load (a fixed
~50 MiB of Python modules, printed separately). Reported per rank: peak growth over the
level before the load,
as a multiple of the loaded model's bytes (the whole bfloat16 model), what the rank
holds afterwards, and the load's wall time.
Writes ``benchmarks/results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
)


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Samples ``rss_anon()`` on a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval, self.peak, self._stop = interval, rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def write_checkpoint(path: str) -> None:
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG))
    model.save_pretrained(path, max_shard_size="200MB")


def _rank(rank: int, world: int, port: int, path: str, way: str, out: Any) -> None:
    import torch.distributed as dist
    import transformers as T
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import shardwise
    from shardwise.hf import from_pretrained

    T.logging.set_verbosity_error()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    # Import transformers' Llama code first: a one-time cost (Python modules, ~50 MiB of
    # RssAnon here) that does not grow with the model. It is reported on its own.
    imported = rss_anon()
    T.LlamaForCausalLM  # noqa: B018 - the lazy import
    imported = rss_anon() - imported
    dist.barrier()
    before = rss_anon()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if way == "shardwise":
            model = from_pretrained(path, mesh, dtype=torch.bfloat16)
        else:
            model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            model = shardwise.parallelize_module(model, mesh, "auto")
        dist.barrier()
    seconds = time.perf_counter() - start
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    local = sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        for p in model.parameters()
    )
    out.put(
        {"rank": rank, "way": way, "peak_growth": sampler.peak - before, "import": imported,
         "after": rss_anon() - before, "model_bytes": full, "local_bytes": local,
         "seconds": seconds}
    )
    dist.destroy_process_group()


def measure(path: str, way: str, world: int) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, path, way, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="checkpoint directory (written if absent)")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    path = args.dir or os.path.join(tempfile.gettempdir(), "shardwise-bench-llama600")
    if not (Path(path) / "config.json").is_file():
        proc = mp.get_context("spawn").Process(target=write_checkpoint, args=(path,))
        proc.start()
        proc.join()
    files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    rows = []
    for way in ("shardwise", "whole-then-shard"):
        for r in measure(path, way, args.world):
            r["ratio"] = r["peak_growth"] / r["model_bytes"]
            rows.append(r)
    mb = 2**20
    print(f"checkpoint: {files / mb:.0f} MiB float32 on disk; loaded in bfloat16 at TP {args.world}")
    print(f"loaded model: {rows[0]['model_bytes'] / mb:.0f} MiB in bfloat16")
    print("| way | rank | peak RssAnon growth | / loaded model | params held after | load time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['way']} | {r['rank']} | {r['peak_growth'] / mb:.0f} MiB | {r['ratio']:.3f} | "
            f"{r['local_bytes'] / mb:.0f} MiB ({r['local_bytes'] / r['model_bytes']:.3f}) | "
            f"{r['seconds']:.2f} s |"
        )
    print(f"one-time import of the Llama code, before the load: {rows[0]['import'] / mb:.0f} MiB")
    RESULTS.mkdir(exist_ok=True)
    record = {"config": CONFIG, "world": args.world, "checkpoint_bytes": files, "rows": rows}
    (RESULTS / "load.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
