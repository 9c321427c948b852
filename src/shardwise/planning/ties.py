"""Tied parameters (one ``nn.Parameter`` held by several modules) under a plan.

Sharding gives each planned module new DTensor parameters. A parameter that two modules
share, typically an input embedding tied to the output head, would quietly become two
that train apart. :func:`check_ties` runs with the rest of planning (no communication)
and raises unless every module holding a tied parameter is planned and declares the same
placement for it (:meth:`~shardwise.ModuleStyle.param_placements`). :func:`retie` then
points every holder at one DTensor parameter after the plan is applied.

Example::

    >>> ties = check_ties(model, {id(model.embed): ("embed", {"weight": Shard(0)}),
    ...                           id(model.head): ("head", {"weight": Shard(0)})})
    >>> ...  # apply the plan
    >>> retie(ties)   # model.head.weight is model.embed.weight again
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Placement

__all__ = ["Holder", "Planned", "check_ties", "retie", "tied_groups"]

# id(module) -> (its FQN, the placements its style declares, or None if undeclared)
Planned = Mapping[int, tuple[str, Mapping[str, Placement] | None]]


@dataclass(frozen=True)
class Holder:
    """One place a parameter is registered: ``module.<name>``, reached as ``fqn``."""

    fqn: str
    name: str
    module: nn.Module

    @property
    def label(self) -> str:
        return f"{self.fqn}.{self.name}" if self.fqn else self.name


def tied_groups(root: nn.Module) -> list[list[Holder]]:
    """Every parameter registered in more than one place, with its holders in tree order.

    Example::

        >>> [[h.label for h in group] for group in tied_groups(gpt2)]
        [['transformer.wte.weight', 'lm_head.weight']]
    """
    by_param: dict[int, list[Holder]] = {}
    seen: set[tuple[int, str]] = set()
    for fqn, module in root.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is None or (id(module), name) in seen:
                continue  # a module reused under two names holds its parameter once
            seen.add((id(module), name))
            by_param.setdefault(id(param), []).append(Holder(fqn, name, module))
    return [holders for holders in by_param.values() if len(holders) > 1]


def check_ties(root: nn.Module, planned: Planned) -> list[list[Holder]]:
    """Raise if the plan would untie a tied parameter; return the ties to restore.

    ``planned`` maps each module whose parameters the plan replaces to its FQN and
    declared placements. A tie none of whose holders is planned is left alone.

    Example::

        >>> check_ties(model, {id(model.head): ("head", {"weight": Shard(0)})})
        Traceback (most recent call last):
        ValueError: 'embed.weight' and 'head.weight' are one tied parameter, but ...
    """
    keep = []
    for holders in tied_groups(root):
        inside = [h for h in holders if id(h.module) in planned]
        if not inside:
            continue
        names = " and ".join(f"'{h.label}'" for h in holders)
        outside = [h for h in holders if id(h.module) not in planned]
        if outside:
            raise ValueError(
                f"{names} are one tied parameter, but the plan shards only "
                f"{', '.join(repr(h.fqn) for h in inside)}: that would untie them. Give "
                f"{', '.join(repr(h.fqn or type(h.module).__name__) for h in outside)} a style "
                "too, with the same placement (e.g. RowwiseParallel on the embedding and "
                "ColwiseParallel on the output head: both Shard(0)), or leave all of them "
                "out of the plan."
            )
        placements = []
        for h in inside:
            fqn, declared = planned[id(h.module)]
            placement = None if declared is None else declared.get(h.name)
            if placement is None:
                raise ValueError(
                    f"{names} are one tied parameter, but the style on '{fqn}' does not "
                    f"declare how it shards '{h.name}', so the tie cannot be kept; use "
                    "ColwiseParallel/RowwiseParallel there, or leave the tied modules out "
                    "of the plan."
                )
            placements.append(placement)
        if len(set(placements)) > 1:
            found = ", ".join(f"'{h.label}' {p!r}" for h, p in zip(inside, placements))
            raise ValueError(
                f"{names} are one tied parameter, but the plan shards it two ways ({found}); "
                "a tied parameter needs one placement (an embedding under RowwiseParallel "
                "and its output head under ColwiseParallel are both Shard(0))."
            )
        keep.append(holders)
    return keep


def retie(ties: list[list[Holder]]) -> None:
    """Register the first holder's (now DTensor) parameter in every other holder."""
    for first, *rest in ties:
        param = first.module._parameters[first.name]
        for holder in rest:
            holder.module.register_parameter(holder.name, param)
