"""Subclasses that override forward keep their own computation under every style, or are
refused by name before anything moves (Gemma's scaled word embedding is the model case)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from shardwise import ColwiseParallel, RowwiseParallel, SequenceParallel, expand_plan
from shardwise._engine.forward import installed_forward, original_class
from shardwise.testing import check_parity, mesh_of


class ScaledEmbedding(nn.Embedding):
    """Gemma's pattern: the base lookup, then a scale the base class knows nothing of."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__(vocab, dim)
        self.register_buffer("scale", torch.tensor(dim**0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


class ShiftedLinear(nn.Linear):
    """A Linear whose forward adds to the base result (a LoRA-like extra term)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5


class DoubledNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class OwnLinear(nn.Linear):
    """Overrides forward without calling the base class: nothing to parallelize in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() * 3


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = ScaledEmbedding(16, 8)
        self.up = ShiftedLinear(8, 12)
        self.down = nn.Linear(12, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


PLANS = {
    "vocab": {
        "tok": RowwiseParallel(input_layouts=torch.distributed.tensor.Replicate()),
        "up": ColwiseParallel(),
        "down": RowwiseParallel(),
    },
    "features": {
        "tok": ColwiseParallel(output_layouts=torch.distributed.tensor.Replicate()),
        "up": ColwiseParallel(),
        "down": RowwiseParallel(),
    },
}


def _parity(world: int, plan: str) -> int:
    report = check_parity(Model, PLANS[plan], mesh_of(world), lambda step: torch.randint(0, 16, (2, 5)))
    return report.grads


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("world", [1, 2])
def test_a_subclass_forward_is_kept(pools, world, plan):
    # check_parity compares outputs, every gradient and three steps with one device: the
    # embedding's scale and the Linear's shift would be lost if shardwise replaced them.
    assert pools(world).run(_parity, world, plan) == [3 * 7] * world


def _kept_class(world: int) -> tuple[str, str, bool, bool, bool]:
    from shardwise import parallelize_module

    model = parallelize_module(Model(), mesh_of(world), PLANS["vocab"])
    tok = model.tok
    return (
        type(tok).__name__,
        original_class(tok).__qualname__,
        isinstance(tok, ScaledEmbedding),
        installed_forward(tok) is not None,
        installed_forward(model.down) is not None,
    )


def test_the_model_keeps_its_classes(pools):
    name, original, is_instance, installed, plain = pools(2).run(_kept_class, 2)[0]
    assert (name, original, is_instance, installed, plain) == (
        "ScaledEmbedding", "ScaledEmbedding", True, True, True
    )


def _sequence_norm(world: int) -> int:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = DoubledNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    report = check_parity(
        Block, {"norm": SequenceParallel()}, mesh_of(world), lambda step: torch.randn(4, 2, 8),
        sequence_dim=0,
    )
    return report.grads


def test_a_norm_subclass_is_kept_under_sequence_parallel(pools):
    assert pools(2).run(_sequence_norm, 2) == [3 * 2] * 2


@pytest.mark.parametrize("style", [ColwiseParallel(), RowwiseParallel()], ids=repr)
def test_a_forward_without_super_is_refused_by_name(style):
    model = nn.Sequential(OwnLinear(8, 8))
    with pytest.raises(TypeError, match=r"'0'|0: .*OwnLinear\.forward.*super\(\)\.forward"):
        expand_plan(model, {"0": style}, tp_size=2)


def test_generated_classes_are_not_pickled_silently():
    # The kept class is generated: a plain pickle of the module must not quietly produce
    # an object of another class. (Whole-model save paths are the checkpoint functions.)
    from shardwise._engine.forward import _keeping_forward

    cls = _keeping_forward(ScaledEmbedding, nn.Embedding)
    assert cls.__mro__[1] is ScaledEmbedding and cls.__mro__[2].__name__ == "_ParallelEmbedding"
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(cls)
