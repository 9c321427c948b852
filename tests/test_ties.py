"""Tied parameters: kept as one sharded parameter, or refused before anything moves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import ColwiseParallel, ModuleStyle, RowwiseParallel, parallelize_module
from shardwise.testing import check_parity, expect_raises, mesh_of
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance

WORLDS = [1, 2, 4]


class TiedLM(nn.Module):
    """Embedding -> Linear -> output head sharing the embedding's weight (as GPT-2 does)."""

    def __init__(self, vocab: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


VOCAB_PARALLEL = {
    "embed": RowwiseParallel(input_layouts=Replicate()),
    "head": ColwiseParallel(output_layouts=Replicate()),
}


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(step))


def _tied_parity(world: int) -> dict[str, Any]:
    # Vocabulary 10: on 4 ranks the shards are 3, 3, 3 and 1 rows.
    report = check_parity(TiedLM, VOCAB_PARALLEL, mesh_of(world), _ids)
    torch.manual_seed(0)
    model = parallelize_module(TiedLM(), mesh_of(world), VOCAB_PARALLEL)
    assert model.head.weight is model.embed.weight
    assert isinstance(model.embed.weight, DTensor)
    assert model.embed.weight.placements == (Shard(0),)
    assert [n for n, _ in model.named_parameters()] == ["embed.weight", "mix.weight", "mix.bias"]
    state = model.state_dict()
    # Both names are saved (as for any tied module), holding one storage.
    head, embed = state["head.weight"], state["embed.weight"]
    assert head.to_local().data_ptr() == embed.to_local().data_ptr()
    return {"grads": report.grads, "steps": report.steps}


@pytest.mark.parametrize("world", WORLDS)
def test_tied_embedding_and_head_stay_one_parameter(pools, world):
    # The tied weight's gradient is the sum over both uses: checked against the reference.
    results = pools(world).run(_tied_parity, world)
    assert all(r == {"grads": 9, "steps": 3} for r in results), results


class _Undeclared(ModuleStyle):
    """A user's style that replaces parameters without declaring their placements."""

    def apply(self, module: nn.Module, mesh: Any) -> nn.Module:  # pragma: no cover - never reached
        return module


def _tie_errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    with CommDebugMode() as comms:
        model = TiedLM()
        msgs.append(expect_raises(
            ValueError, parallelize_module, model, mesh,
            {"head": ColwiseParallel(output_layouts=Replicate())},
            match=r"'embed.weight' and 'head.weight' are one tied parameter.*only 'head'.*Give 'embed'",
        ))
        assert not isinstance(model.head.weight, DTensor)  # nothing was applied
        msgs.append(expect_raises(
            ValueError, parallelize_module, TiedLM(), mesh,
            {"embed": RowwiseParallel(input_layouts=Replicate()), "head": RowwiseParallel()},
            match=r"shards it two ways \('embed.weight' Shard\(dim=0\), 'head.weight' Shard\(dim=1\)\)",
        ))
        msgs.append(expect_raises(
            ValueError, parallelize_module, TiedLM(), mesh,
            {"embed": RowwiseParallel(input_layouts=Replicate()), "head": _Undeclared()},
            match="style on 'head' does not declare how it shards 'weight'",
        ))
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


@pytest.mark.parametrize("world", [1, 2])
def test_a_plan_that_would_untie_raises_before_communicating(pools, world):
    per_rank = pools(world).run(_tie_errors, world)
    assert all(msgs == per_rank[0] for msgs in per_rank)


def test_untouched_ties_and_shared_modules_are_fine():
    # A shared module (one Linear used twice) is not a tie; an unplanned tie is left alone.
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    from shardwise.planning.ties import check_ties

    assert check_ties(model, {id(lin): ("0", {"weight": Shard(0), "bias": Shard(0)})}) == []
    assert check_ties(TiedLM(), {}) == []


def _train_tied(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        model(_ids(step)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _tied_model(world: int | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TiedLM()
    return model if world is None else parallelize_module(model, mesh_of(world), VOCAB_PARALLEL)


def _save_tied(world: int, path: str) -> torch.Tensor:
    from shardwise.checkpoint import save_checkpoint

    model = _tied_model(world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    _train_tied(model, opt, range(2))
    save_checkpoint(path, model, opt)
    _train_tied(model, opt, range(2, 3))
    return model(_ids(99)).detach()


def _load_tied(world: int | None, path: str) -> torch.Tensor:
    from shardwise.checkpoint import load_checkpoint

    model = _tied_model(world, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    load_checkpoint(path, model, opt)
    assert model.head.weight is model.embed.weight  # loading keeps the tie
    _train_tied(model, opt, range(2, 3))
    return model(_ids(99)).detach()


def test_tied_checkpoint_reshards(pools, tmp_path):
    path = str(tmp_path / "tied")
    saved = pools(2).run(_save_tied, 2, path)[0]
    for got in [*pools(1).run(_load_tied, 1, path), _load_tied(None, path)]:
        # Same logits after one more step: weights and AdamW state both came back.
        # Three AdamW steps over the widest weight (the vocabulary) as the longest sum.
        tol = tolerance(torch.float32, reduction=max(TiedLM().head.weight.shape), steps=3)
        assert_close_at_scale(got, saved, tol=tol, scale=largest_magnitude([saved]), what="logits")
