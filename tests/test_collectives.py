"""Exact collective counts per forward and backward, and GPT-block parity.

Counts come from torch's CommDebugMode, which sees c10d and functional collectives.
"""

from __future__ import annotations

import pytest
import torch

from models import MLP
from shardwise import PairwiseParallel, SequenceParallel, parallelize_module
from shardwise.testing import check_parity, mesh_of
from shardwise.testing.comms import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, fwd_bwd_counts
from shardwise.testing.models import GPTBlock, GPTStack, gpt_block_plan

AR, AG, RS = ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER


def _mlp_counts(world: int, sp: bool, save_gathered: bool = False) -> tuple[dict, dict]:
    torch.manual_seed(0)
    style = SequenceParallel(save_gathered_input=save_gathered) if sp else PairwiseParallel()
    model = parallelize_module(MLP(), mesh_of(world), style)
    return fwd_bwd_counts(model, torch.randn(8 // world if sp else 8, 2, 16))


def _block_counts(world: int, sp: bool, depth: int, save_gathered: bool = False) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = GPTStack(32, 4, depth)
    plan = gpt_block_plan(sp, save_gathered_input=save_gathered)
    model = parallelize_module(model, mesh_of(world), {"blocks.*": plan})
    seq = 16 // world if sp else 16
    return fwd_bwd_counts(model, torch.randn(seq, 2, 32))


@pytest.mark.parametrize("world", [2, 4])
def test_mlp_collective_counts(pools, world):
    # Every rank runs the same collectives (a rank that skipped one would hang the rest).
    assert pools(world).run(_mlp_counts, world, False) == [({AR: 1}, {AR: 1})] * world
    # Backward all-gathers the saved sequence shard again for the weight gradient.
    assert pools(world).run(_mlp_counts, world, True) == [({AG: 1, RS: 1}, {AG: 2, RS: 1})] * world
    # The gathered input saved instead: no second all-gather.
    assert pools(world).run(_mlp_counts, world, True, True) == [({AG: 1, RS: 1}, {AG: 1, RS: 1})] * world


@pytest.mark.parametrize("depth", [1, 2])
def test_gpt_block_collective_counts(pools, depth):
    # One all-reduce after attention and one after the MLP in forward; in backward one
    # for q/k/v together (they share their input) and one for the MLP's up projection.
    counts = pools(2).run(_block_counts, 2, False, depth)
    assert counts == [({AR: 2 * depth}, {AR: 2 * depth})] * 2, counts


@pytest.mark.parametrize("depth", [1, 2])
def test_gpt_block_sequence_parallel_counts(pools, depth):
    # Backward mirrors forward, plus one all-gather per gathered activation (q/k/v share
    # theirs) to rebuild the input the weight gradients need from the saved shard; the 4
    # all-reduces sum the LayerNorm weight/bias gradients of the sequence-parallel norms
    # (replicated weights, sequence-sharded activations). Every rank runs the same ones.
    fwd = {AG: 2 * depth, RS: 2 * depth}
    bwd = {AG: 4 * depth, RS: 2 * depth, AR: 4 * depth}
    assert pools(2).run(_block_counts, 2, True, depth) == [(fwd, bwd)] * 2
    saved = {AG: 2 * depth, RS: 2 * depth, AR: 4 * depth}  # the gathered input saved instead
    assert pools(2).run(_block_counts, 2, True, depth, True) == [(fwd, saved)] * 2


def _gpt_parity(world: int, sp: bool) -> dict:
    report = check_parity(
        lambda: GPTBlock(32, 4), gpt_block_plan(sp), mesh_of(world),
        lambda step: torch.randn(8, 2, 32), sequence_dim=0 if sp else None,
    )
    return vars(report)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_gpt_block_parity(pools, world, sp):
    for report in pools(world).run(_gpt_parity, world, sp):
        assert report["steps"] == 3 and report["grads"] == 3 * 16
