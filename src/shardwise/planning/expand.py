"""A user's plan, expanded into the flat per-module plan that actually runs.

A plan is one style for the whole model, or a dict from FQN (atoms may be globs,
``"layers.*.mlp"``; values may be nested dicts) to a style. Expansion resolves every
key to the modules it names, asks each style to :meth:`~shardwise.styles.base.ModuleStyle.expand`
itself into primitive entries, and returns them in order as ``{fqn: style}``. Nothing
here touches the model or communicates: the same plan gives the same flat plan on
every rank, which ``parallelize_module`` then checks and applies.

Example::

    >>> expand_plan(model, {"blocks.*": gpt_block_plan()}, tp_size=2)
    {'blocks.0.q': ColwiseParallel(...), 'blocks.0.k': ColwiseParallel(...), ...}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..styles.base import ModuleStyle, ParallelStyle, PlanContext, PlanMesh, join_fqn
from ..styles.composite import as_module_style
from .agreement import describe_style

__all__ = ["Entry", "Plan", "check_entries", "expand_entries", "expand_plan"]

Plan = ParallelStyle | Mapping[str, Any]


@dataclass(frozen=True)
class Entry:
    """One primitive plan entry: a style on the module at ``fqn``."""

    fqn: str
    module: nn.Module
    style: ModuleStyle

    @property
    def what(self) -> str:
        """The style, described the same way on every rank (for the plan fingerprint)."""
        return describe_style(self.style)


def expand_plan(model: nn.Module, plan: Plan, tp_size: int) -> dict[str, ModuleStyle]:
    """The flat ``{fqn: primitive style}`` plan that ``parallelize_module`` would apply.

    Runs every entry's check for a TP size of ``tp_size`` (so a plan that
    ``parallelize_module`` would refuse raises the same error here), without touching
    ``model`` or communicating.

    Example::

        >>> for fqn, style in expand_plan(model, PairwiseParallel(), tp_size=8).items():
        ...     print(fqn, style)
        net1 ColwiseParallel(_prepare_input=make_input_replicate_1d, ...)
        net2 RowwiseParallel(_prepare_input=make_input_shard_1d_last_dim, ...)
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    entries = expand_entries(model, plan, PlanContext(tp_size))
    check_entries(entries, PlanMesh(tp_size))
    return {entry.fqn: entry.style for entry in entries}


def expand_entries(model: nn.Module, plan: Plan, ctx: PlanContext) -> list[Entry]:
    """Resolve ``plan`` on ``model`` and expand every style into primitive entries.

    Raises ``RuntimeError``/``AttributeError`` for keys that match nothing, values that
    are not styles, composite styles that find nothing to parallelize, and two
    exclusive entries on one module.
    """
    entries: list[Entry] = []
    if isinstance(plan, ParallelStyle):
        _expand_top(model, "", as_module_style(plan), ctx, entries)
    else:
        _expand_dict(model, "", plan, ctx, entries)
    _check_claims(entries)
    return entries


def check_entries(entries: list[Entry], mesh: Any) -> None:
    """Run every entry's :meth:`~ModuleStyle.check` (no communication)."""
    for entry in entries:
        entry.style.check(entry.module, entry.fqn, mesh)


def _expand_dict(
    root: nn.Module, prefix: str, plan: Mapping[str, Any], ctx: PlanContext, out: list[Entry]
) -> None:
    for key, value in plan.items():
        if not isinstance(key, str):
            raise RuntimeError(
                f"parallelize_plan keys must be module FQN strings, got {key!r} "
                f"({type(key).__name__})."
            )
        for fqn, module in resolve(root, key):
            full = join_fqn(prefix, fqn)
            if isinstance(value, Mapping):
                _expand_dict(module, full, value, ctx, out)
            elif isinstance(value, ParallelStyle):
                _expand_top(module, full, as_module_style(value), ctx, out)
            else:
                raise RuntimeError(
                    "Expect Union[ParallelStyle, Dict[str, ParallelStyle]] for "
                    f"parallelize_plan['{key}'], {type(value)} found!"
                )


def _expand_top(
    module: nn.Module, fqn: str, style: ModuleStyle, ctx: PlanContext, out: list[Entry]
) -> None:
    expanded = style.expand(module, fqn, ctx)
    if not expanded:
        raise RuntimeError(
            f"{type(style).__name__} found nothing to parallelize in "
            f"'{fqn or type(module).__name__}' ({type(module).__name__}): it applies to an "
            "MLP with an even number of direct nn.Linear children, nn.MultiheadAttention, "
            "or nn.Transformer and its layers."
        )
    for sub_fqn, sub_style in expanded.items():
        out.append(Entry(sub_fqn, module.get_submodule(_relative(fqn, sub_fqn)), sub_style))


def _relative(prefix: str, fqn: str) -> str:
    """``fqn`` as seen from the module at ``prefix`` (which contains it)."""
    if fqn == prefix:
        return ""
    if prefix and not fqn.startswith(prefix + "."):
        raise RuntimeError(f"a style expanded '{prefix}' into '{fqn}', which is outside it")
    return fqn[len(prefix) + 1 :] if prefix else fqn


def _check_claims(entries: list[Entry]) -> None:
    """One exclusive entry per module (a module shared under two names counts once)."""
    claimed: dict[int, str] = {}
    for entry in entries:
        if not entry.style.exclusive:
            continue
        previous = claimed.get(id(entry.module))
        if previous is not None:
            raise ValueError(
                f"'{entry.fqn or type(entry.module).__name__}' is covered by two plan entries "
                f"(also as '{previous or type(entry.module).__name__}'); give each module one style."
            )
        claimed[id(entry.module)] = entry.fqn


def resolve(root: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """Every submodule matching ``key``; atoms may be fnmatch globs (``layers.*.mlp``).

    Example::

        >>> [fqn for fqn, _ in resolve(model, "blocks.*.mlp")]
        ['blocks.0.mlp', 'blocks.1.mlp']
    """
    if key == "":
        return [("", root)]
    matches: list[tuple[str, nn.Module]] = [("", root)]
    for atom in key.split("."):
        nxt: list[tuple[str, nn.Module]] = []
        for path, module in matches:
            children = dict(module.named_children())
            if any(ch in atom for ch in "*?["):
                names = [n for n in children if fnmatch.fnmatchcase(n, atom)]
            else:
                names = [atom] if atom in children else []
            nxt.extend((join_fqn(path, n), children[n]) for n in names)
        if not nxt:
            where = matches[0][0] or type(root).__name__
            owner = type(matches[0][1]).__name__
            raise AttributeError(
                f"{owner} has no attribute `{atom}` (plan key '{key}' matches no submodule "
                f"of '{where}')"
            )
        matches = nxt
    return matches
