"""Parity of Colwise/Rowwise/Pairwise/Sequence parallel MLPs with one process."""

from __future__ import annotations

import pytest
import torch

from models import MLP, DeepMLP, Encoder
from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    make_output_tensor,
)
from shardwise.testing import check_parity, mesh_of

WORLDS = [1, 2, 4]


def _pairwise_mlp(world: int) -> dict:
    report = check_parity(MLP, PairwiseParallel(), mesh_of(world), lambda s: torch.randn(4, 5, 16))
    return vars(report)


def _pairwise_deep(world: int) -> dict:
    report = check_parity(DeepMLP, PairwiseParallel(), mesh_of(world), lambda s: torch.randn(3, 16))
    return vars(report)


def _dict_plan(world: int) -> dict:
    plan = {"net1": ColwiseParallel(), "net2": RowwiseParallel()}
    return vars(check_parity(MLP, plan, mesh_of(world), lambda s: torch.randn(2, 7, 16)))


def _glob_plan(world: int) -> dict:
    plan = {"blocks.*.net1": ColwiseParallel(), "blocks.*.net2": RowwiseParallel()}
    return vars(check_parity(Encoder, plan, mesh_of(world), lambda s: torch.randn(2, 3, 16)))


def _colwise_gathered(world: int) -> dict:
    plan = {"net1": ColwiseParallel(_prepare_output=make_output_tensor)}
    return vars(check_parity(MLP, plan, mesh_of(world), lambda s: torch.randn(6, 16)))


def _sequence_mlp(world: int) -> dict:
    report = check_parity(
        MLP, SequenceParallel(), mesh_of(world), lambda s: torch.randn(8, 2, 16), sequence_dim=0
    )
    return vars(report)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "body", [_pairwise_mlp, _pairwise_deep, _dict_plan, _glob_plan, _colwise_gathered, _sequence_mlp]
)
def test_mlp_parity(pools, world, body):
    for report in pools(world).run(body, world):
        # Every parameter's gradient and value compared at each of the 3 steps.
        n = len(report["names"])
        assert report["steps"] == 3 and report["grads"] == report["params"] == 3 * n > 0, report
