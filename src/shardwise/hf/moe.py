"""The auto plan's mixture-of-experts and multi-head latent attention part.

:func:`experts_and_latent_attention` finds MoE blocks (experts stored as fused 3-D
parameters or as a list of MLPs, routers, shared experts) and MLA attention (DeepSeek
V2/V3 and relatives) in a Hugging Face model, from the model's own ``tp_plan`` where it
has one and from its modules otherwise, and returns their entries as a
:class:`~shardwise.hf.partial.PartialPlan` that :func:`shardwise.hf.auto_plan` merges
with the dense part.

Example::

    >>> part = experts_and_latent_attention(model, model.tp_plan, tp_size=2)
    >>> sorted(part.entries)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .partial import PartialPlan

__all__ = ["experts_and_latent_attention"]


def experts_and_latent_attention(
    model: nn.Module, hf_plan: Mapping[str, str], tp_size: int | None
) -> PartialPlan:
    """Entries for ``model``'s MoE blocks and MLA attention; claims what it plans.

    Args:
        model: a ``transformers`` model.
        hf_plan: the model's full transformers TP plan (glob key -> style string; empty
            when it has none).
        tp_size: the tensor-parallel size the plan is for (``None``: not known yet).

    Example::

        >>> experts_and_latent_attention(mixtral, mixtral.tp_plan, 2).claimed
        {'model.layers.0.mlp', 'model.layers.1.mlp'}
    """
    return PartialPlan()  # filled in by the MoE/MLA work; the dense planner merges it
