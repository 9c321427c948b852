"""Parameter groups that let torch's foreach optimizers run on a parallelized model.

A parallelized model holds two kinds of parameters: DTensors (what shardwise sharded or
replicated) and plain tensors (modules the plan left alone). Given such a mix, torch's
optimizers fall back to their per-parameter loop, which on DTensors dispatches every
elementwise op separately (AdamW on a 2-block GPT: 4.7 ms a step instead of 1.3 ms).
Asking for ``foreach=True`` instead fails, because one foreach kernel cannot take DTensors
and plain tensors together. Splitting each group by kind fixes both.

Example::

    >>> opt = torch.optim.AdamW(foreach_param_groups(model.parameters()), lr=1e-3, foreach=True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["foreach_param_groups"]


def foreach_param_groups(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Split parameters (or parameter groups) so no group mixes DTensors and plain tensors.

    Each group becomes at most two groups, DTensors first, both with the group's own
    options (``lr``, ``weight_decay``...); a kind with no parameters gives no group. The
    order of parameters within a kind is kept, so the split is the same on every rank
    and from run to run. An optimizer whose state is loaded later must be built the same
    way (DCP's FQN-keyed optimizer state dicts do not depend on it).

    Example::

        >>> groups = foreach_param_groups([
        ...     {"params": decay, "weight_decay": 0.1},
        ...     {"params": no_decay, "weight_decay": 0.0},
        ... ])
        >>> opt = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
    """
    items = list(params)
    if not items:
        raise ValueError("foreach_param_groups() got no parameters")
    dicts = [isinstance(g, dict) for g in items]
    if any(dicts) and not all(dicts):
        raise TypeError(
            "foreach_param_groups() takes either parameters or parameter-group dicts, not both"
        )
    groups: list[dict[str, Any]] = (
        [dict(g) for g in items if isinstance(g, dict)] if all(dicts) else [{"params": items}]
    )
    out = []
    for index, group in enumerate(groups):
        if "params" not in group:
            raise ValueError(f"foreach_param_groups(): parameter group {index} has no 'params'")
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        for kind in (True, False):
            chosen = [p for p in members if isinstance(p, DTensor) is kind]
            if chosen:
                out.append({**group, "params": chosen})
    return out
