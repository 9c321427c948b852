"""``shardwise.auto_plan`` and its registry: the core resolves "auto" without importing ``hf``."""

from __future__ import annotations

import ast
import inspect

import pytest
from torch import nn

import shardwise
import shardwise.api
from shardwise import ColwiseParallel, RowwiseParallel, auto_plan, register_auto_plan
from shardwise.planning.auto import _PLANNERS


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)


def _tiny_plan(model: nn.Module, *, tp_size: int | None, vocab_parallel: bool) -> dict:
    return {"up": ColwiseParallel(), "down": RowwiseParallel(), "tp": tp_size}


def test_api_does_not_import_hf():
    tree = ast.parse(inspect.getsource(shardwise.api))
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ]
    assert "planning.auto" in imported and not any(m == "hf" or m.startswith("hf.") for m in imported)


def test_registry_dispatches_and_names_its_planners():
    before = list(_PLANNERS)
    try:
        register_auto_plan("tiny", lambda m: isinstance(m, _Tiny), _tiny_plan)
        plan = auto_plan(_Tiny(), tp_size=2)
        assert isinstance(plan["up"], ColwiseParallel) and plan["tp"] == 2
        register_auto_plan("tiny", lambda m: False, _tiny_plan)  # replaced, not added
        assert [p.name for p in _PLANNERS].count("tiny") == 1
        with pytest.raises(NotImplementedError, match=r"no registered planner .*huggingface, tiny"):
            auto_plan(_Tiny())
    finally:
        _PLANNERS[:] = before


def test_top_level_auto_plan_plans_hf_models():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    plan = shardwise.auto_plan(model, tp_size=2)
    assert repr(plan) == repr(shardwise.hf.auto_plan(model, tp_size=2))
    assert isinstance(plan["model.embed_tokens"], RowwiseParallel)  # vocabulary sharded
