"""check_layouts: inputs that contradict their declared layout raise on every rank, no hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from models import MLP
from shardwise import ColwiseParallel, PairwiseParallel, RowwiseParallel, parallelize_module
from shardwise.debug import check_layouts
from shardwise.testing import expect_raises, mesh_of


def _mlp(world: int) -> nn.Module:
    torch.manual_seed(0)
    return parallelize_module(MLP(), mesh_of(world), PairwiseParallel())


def _matching_inputs_pass(world: int) -> dict:
    model = _mlp(world)
    x = torch.randn(4, 16)
    plain = model(x)
    with CommDebugMode() as without:
        model(x)
    with check_layouts(model) as check:
        checked = model(x)
    with CommDebugMode() as after:
        model(x)
    assert torch.equal(checked, plain)  # the check observes; it changes nothing
    assert after.get_total_counts() == without.get_total_counts()  # hooks gone on exit
    return {"checked": check.checked}


@pytest.mark.parametrize("world", [2, 4])
def test_matching_inputs_pass(pools, world):
    # net1 (Replicate input: shape and values) and net2 (Shard(-1) input: shape) checked.
    assert pools(world).run(_matching_inputs_pass, world) == [{"checked": 2}] * world


def _mismatches(world: int) -> list[str]:
    rank = dist.get_rank()
    model = _mlp(world)
    msgs = []
    with check_layouts(model):
        # Data parallelism done wrong: each TP rank got its own batch.
        msgs.append(expect_raises(ValueError, model, torch.randn(4, 16) + rank,
                                  match=r"'net1' \(Linear\).*values differ across the"))
        msgs.append(expect_raises(ValueError, model, torch.randn(4 + rank, 16),
                                  match=r"'net1'.*shape differs.*dim 0: 4\.\.5"))
    torch.manual_seed(0)
    emb = parallelize_module(
        nn.Embedding(10, 8), mesh_of(world), RowwiseParallel(input_layouts=Replicate())
    )
    with check_layouts(emb):
        ids = torch.tensor([[1, 2, 3]]) if rank == 0 else torch.tensor([[1, 2, 4]])
        msgs.append(expect_raises(ValueError, emb, ids, match="Embedding.*values differ"))
    sp = parallelize_module(nn.Linear(8, 8), mesh_of(world), ColwiseParallel(input_layouts=Shard(0)))
    with check_layouts(sp):
        sp(torch.randn(3, 2, 8))
        msgs.append(expect_raises(ValueError, sp, torch.randn(3, 2 + rank, 8),
                                  match=r"declared Shard\(dim=0\).*dim 1: 2\.\.3"))
        # The module all-gathers its sequence shards: torch.chunk lengths (4 + 3 for 7).
        sp(torch.randn(4 - rank, 2, 8))
        msgs.append(expect_raises(ValueError, sp, torch.randn(3 + rank, 2, 8),
                                  match=r"lengths along dim 0 are \[3, 4\], not the torch.chunk "
                                        r"split of 7 over 2 ranks: \[4, 3\]"))
    row = parallelize_module(nn.Linear(5, 4), mesh_of(world), RowwiseParallel())
    with check_layouts(row):
        row(torch.randn(2, 3 - rank))  # 5 features on 2 ranks: 3 + 2, as torch.chunk splits
        msgs.append(expect_raises(ValueError, row, torch.randn(2, 2 + rank),
                                  match=r"lengths along dim 1 are \[2, 3\], not the torch.chunk split of 5"))
    return msgs


def test_mismatches_raise_on_every_rank(pools):
    per_rank = pools(2).run(_mismatches, 2)
    assert len(per_rank[0]) == 6 and per_rank[0] == per_rank[1]


def test_needs_a_parallelized_model():
    with pytest.raises(ValueError, match="no parallelized module"):
        check_layouts(nn.Linear(2, 2))
