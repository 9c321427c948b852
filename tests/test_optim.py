"""foreach_param_groups: foreach optimizers on a parallelized model, same steps as the reference."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from shardwise import foreach_param_groups, parallelize_module
from shardwise.testing import check_parity, full, mesh_of
from shardwise.testing.models import GPTStack, gpt_block_plan

WORLDS = [1, 2, 4]


def _adamw_foreach(params):
    # The key bias gets an exactly-zero gradient in exact arithmetic (softmax ignores a
    # shift shared by a whole row), so it is rounding noise that differs between TP and
    # the reference; a larger eps keeps Adam from blowing that noise up to lr-sized steps.
    return torch.optim.AdamW(foreach_param_groups(params), lr=1e-2, eps=1e-3, foreach=True)


def _gpt_parity_with_foreach_adamw(world: int) -> None:
    check_parity(
        lambda: GPTStack(32, 4, 2),
        {"blocks.*": gpt_block_plan()},
        mesh_of(world),
        lambda step: torch.randn(8, 2, 32),
        optimizer=_adamw_foreach,
    )


@pytest.mark.parametrize("world", WORLDS)
def test_foreach_adamw_trains_like_the_reference(pools, world):
    pools(world).run(_gpt_parity_with_foreach_adamw, world)


def _groups_split_by_kind_and_keep_options(world: int) -> None:
    torch.manual_seed(0)
    model = parallelize_module(GPTStack(32, 4, 1), mesh_of(world), {"blocks.*": gpt_block_plan()})
    named = dict(model.named_parameters())
    decay = [p for n, p in named.items() if n.endswith("weight")]
    no_decay = [p for n, p in named.items() if n.endswith("bias")]
    groups = foreach_param_groups(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "weight_decay": 0.0, "lr": 3.0},
        ]
    )
    kinds = [(isinstance(g["params"][0], DTensor), g["weight_decay"], g.get("lr")) for g in groups]
    # LayerNorm parameters stay plain tensors; the Linear parameters are DTensors.
    assert kinds == [(True, 0.1, None), (False, 0.1, None), (True, 0.0, 3.0), (False, 0.0, 3.0)], (
        kinds
    )
    for g in groups:
        assert len({isinstance(p, DTensor) for p in g["params"]}) == 1
    flat = [p for g in groups for p in g["params"]]
    assert sorted(map(id, flat)) == sorted(map(id, named.values()))
    # Order within a kind is kept (so every rank builds the same optimizer).
    assert groups[0]["params"] == [p for p in decay if isinstance(p, DTensor)]
    # A bare iterable (a generator) gives at most one group per kind.
    assert [len(g["params"]) for g in foreach_param_groups(model.parameters())] == [
        sum(isinstance(p, DTensor) for p in named.values()),
        sum(not isinstance(p, DTensor) for p in named.values()),
    ]


@pytest.mark.parametrize("world", [2])
def test_groups_split_by_kind_and_keep_options(pools, world):
    pools(world).run(_groups_split_by_kind_and_keep_options, world)


def _mixed_foreach_fails_without_split(world: int) -> None:
    """Why the helper exists: torch refuses a foreach step over DTensors and tensors mixed."""
    torch.manual_seed(0)
    model = parallelize_module(GPTStack(16, 2, 1), mesh_of(world), {"blocks.*": gpt_block_plan()})
    x = torch.randn(4, 2, 16)
    full(model(x)).sum().backward()
    before = [full(p.detach()).clone() for p in model.parameters()]
    mixed = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        mixed.step()
    split = torch.optim.SGD(foreach_param_groups(model.parameters()), lr=0.1, foreach=True)
    split.step()
    after = [full(p.detach()) for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_mixed_foreach_fails_without_split(pools):
    pools(2).run(_mixed_foreach_fails_without_split, 2)


def test_bad_arguments_name_the_problem():
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="got no parameters"):
        foreach_param_groups([])
    with pytest.raises(ValueError, match="parameter group 1 has no 'params'"):
        foreach_param_groups([{"params": [w]}, {"lr": 1.0}])
    with pytest.raises(TypeError, match="not both"):
        foreach_param_groups([w, {"params": []}])
    # A group may hold a single tensor, as torch allows; its options are kept.
    assert foreach_param_groups([{"params": w, "lr": 0.5}]) == [{"params": [w], "lr": 0.5}]
