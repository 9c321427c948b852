"""What one part of the auto plan decided, in a form the parts can be merged from.

:func:`shardwise.hf.auto_plan` is assembled from planners that each know one family of
modules (dense attention and MLPs, mixture-of-experts layers, multi-head latent
attention, ...). Each returns a :class:`PartialPlan`: its entries, the modules it claims
(no other planner may plan them or anything inside them), and the modules it leaves
replicated with the reason, which :func:`~shardwise.hf.auto_plan` reports.

Example::

    >>> part = PartialPlan()
    >>> part.entries["model.layers.*.mlp.experts"] = SomeExpertsStyle()
    >>> part.claimed.update({"model.layers.0.mlp", "model.layers.1.mlp"})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..styles.base import ParallelStyle

__all__ = ["PartialPlan"]


@dataclass
class PartialPlan:
    """Entries for some modules of a model, and what the planner decided about the rest.

    * ``entries``: plan keys (FQN, globs allowed) -> styles, as in any shardwise plan.
    * ``claimed``: concrete module FQNs this planner owns, with everything inside them;
      other planners leave them alone (a router inside a claimed MoE block included).
    * ``replicated``: concrete module FQNs this planner looked at and left replicated,
      each with the reason (reported by ``auto_plan`` as a warning).
    """

    entries: dict[str, ParallelStyle] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    replicated: dict[str, str] = field(default_factory=dict)

    def merge(self, other: PartialPlan) -> None:
        """Add ``other``'s decisions to this plan (entries for one key must agree).

        Example::

            >>> plan.merge(moe_part)
        """
        for key, style in other.entries.items():
            mine = self.entries.get(key)
            if mine is not None and mine is not style and repr(mine) != repr(style):
                raise ValueError(f"two planners disagree on '{key}': {mine!r} and {style!r}")
            self.entries[key] = style
        self.claimed |= other.claimed
        self.replicated.update(other.replicated)
