"""``auto_plan`` and the small registry behind ``parallelize_module(model, mesh, "auto")``.

The core does not know any model family. A family's package registers a planner
(:func:`register_auto_plan`): a test that says whether a model is one of its own, and a
function that builds the plan dict. ``shardwise.hf`` registers Hugging Face models when
it is imported, which ``import shardwise`` does. :func:`auto_plan` asks the planners in
registration order and uses the first that accepts the model.

Example::

    >>> plan = shardwise.auto_plan(model, tp_size=2)        # a printable dict
    >>> register_auto_plan("mine", lambda m: isinstance(m, MyNet), my_plan)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["auto_plan", "register_auto_plan"]

#: ``build(model, tp_size=..., vocab_parallel=...)`` -> plan dict (FQN glob -> style).
PlanBuilder = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class _Planner:
    name: str
    accepts: Callable[[nn.Module], bool]
    build: PlanBuilder


_PLANNERS: list[_Planner] = []


def register_auto_plan(
    name: str, accepts: Callable[[nn.Module], bool], build: PlanBuilder
) -> None:
    """Let ``"auto"`` plan the models ``accepts`` says yes to, with ``build``.

    Registering a name again replaces the earlier planner of that name, in place.

    Example::

        >>> register_auto_plan("hf", lambda m: hasattr(m, "config"), shardwise.hf.auto_plan)
    """
    planner = _Planner(name, accepts, build)
    for i, old in enumerate(_PLANNERS):
        if old.name == name:
            _PLANNERS[i] = planner
            return
    _PLANNERS.append(planner)


def auto_plan(
    model: nn.Module, *, tp_size: int | None = None, vocab_parallel: bool = True
) -> dict[str, Any]:
    """A tensor-parallel plan for ``model`` from the first registered planner that accepts it.

    With ``shardwise.hf`` (registered by ``import shardwise``) that is
    :func:`shardwise.hf.auto_plan` for Hugging Face Llama, Mistral, Qwen2, GPT-2 and BERT:
    attention and MLPs sharded, and by default the vocabulary too (the input embeddings
    vocabulary-parallel, the output head column-parallel, tied or not).

    Keyword Args:
        tp_size: the tensor-parallel size the plan is for (``None``: whole heads per rank).
        vocab_parallel: shard the input embeddings and output head over the vocabulary.

    Raises ``NotImplementedError`` naming the registered planners when none accepts it.

    Example::

        >>> shardwise.auto_plan(LlamaForCausalLM(config), tp_size=2)
        {'model.layers.*.self_attn': AttentionHeads(heads=4, kv_heads=2, head_dim=16), ...}
    """
    for planner in _PLANNERS:
        if planner.accepts(model):
            return planner.build(model, tp_size=tp_size, vocab_parallel=vocab_parallel)
    names = ", ".join(p.name for p in _PLANNERS) or "none"
    raise NotImplementedError(
        f"auto_plan: no registered planner accepts {type(model).__name__} (registered: "
        f"{names}); pass a plan dict instead of 'auto'."
    )
