"""Sequence-parallel column layers that save the shard: parity on both layouts and modes,
and a retained graph run twice (the shared backward all-gather is rebuilt)."""

from __future__ import annotations

import copy

import pytest
import torch

from shardwise import parallelize_module
from shardwise.testing import check_parity, full, mesh_of
from shardwise.testing.models import GPTStack, gpt_block_plan


def _parity(world: int, batch_first: bool, save_gathered: bool) -> int:
    plan = gpt_block_plan(True, batch_first=batch_first, save_gathered_input=save_gathered)
    report = check_parity(
        lambda: GPTStack(32, 4, depth=2, batch_first=batch_first),
        {"blocks.*": plan},
        mesh_of(world),
        lambda step: torch.randn(2, 8, 32) if batch_first else torch.randn(8, 2, 32),
        sequence_dim=1 if batch_first else 0,
        steps=2,
    )
    return report.grads


@pytest.mark.parametrize(
    ("world", "save_gathered"), [(2, False), (4, False), (2, True)], ids=["2", "4", "2-gathered"]
)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_sequence_parallel_parity(pools, world, batch_first, save_gathered):
    for grads in pools(world).run(_parity, world, batch_first, save_gathered):
        assert grads == 2 * 2 * 16  # steps x blocks x parameters per block


def _retained_twice(world: int) -> None:
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    ref = GPTStack(32, 4, depth=1, batch_first=True)
    tp = parallelize_module(
        copy.deepcopy(ref), mesh_of(world), {"blocks.*": gpt_block_plan(True, batch_first=True)}
    )
    x = torch.randn(2, 8, 32)
    loss_ref = ref(x).pow(2).sum()
    loss_tp = tp(x.chunk(world, 1)[rank]).pow(2).sum()
    for _ in range(2):  # the second pass all-gathers the saved shards again
        loss_ref.backward(retain_graph=True)
        loss_tp.backward(retain_graph=True)
    tp_params = dict(tp.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full(tp_params[name].grad), p.grad, msg=name)


@pytest.mark.parametrize("world", [2])
def test_retained_graph_backward_twice(pools, world):
    pools(world).run(_retained_twice, world)
