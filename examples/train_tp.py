"""Train a tiny transformer LM with PairwiseParallel and check it against one process.

Run:  torchrun --standalone --nproc_per_node=2 examples/train_tp.py
(also runs as plain ``python examples/train_tp.py``: a world of one).

Every rank also trains an unparallelized copy from the same initial weights on the same
batches, and the script prints both losses per step and fails if they ever differ.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(__file__))
from tiny_transformer import TinyTransformerLM

import shardwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args()

    if "RANK" not in os.environ:  # plain `python`: a single-rank world
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)
    reference = TinyTransformerLM(seq_len=args.seq)
    model = shardwise.parallelize_module(copy.deepcopy(reference), mesh, shardwise.PairwiseParallel())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    opt_tp = torch.optim.AdamW(shardwise.foreach_param_groups(model.parameters()), lr=3e-3, foreach=True)

    data = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        tokens = torch.randint(0, 64, (args.batch, args.seq + 1), generator=data)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses = []
        for net, opt in ((reference, opt_ref), (model, opt_tp)):
            logits = net(inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]))
        if rank == 0:
            print(f"step {step:2d}  single-process loss {losses[0]:.6f}  "
                  f"TP={world} loss {losses[1]:.6f}  |diff| {abs(losses[0] - losses[1]):.2e}")
    ok = worst < 1e-4
    if rank == 0:
        verdict = "equal to" if ok else "DIFFERENT from"
        print(f"TP={world} losses are {verdict} the single-process run (max |diff| {worst:.2e})")
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
