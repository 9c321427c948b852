"""The one protocol of a parallelized module's forward.

Every forward shardwise installs on a module (column/row Linear, Embedding, Conv1D,
head-sliced projections) is a :class:`ParallelForward` bound to the module as its
``forward`` method. It declares what tools read without knowing each kind:

* ``group``: the TP process group it communicates over;
* ``input_layout``: how a plain input must be laid out across the group (``None``: not
  declared, e.g. a user's own seed-style function decides);
* ``output_layout``: the layout the caller receives (``None``: not declared);
* ``uneven_input_ok``: whether a ``Shard`` input may be split unevenly (torch.chunk
  sizes), as a row-parallel Linear's features may; one it gathers must split evenly.

:func:`installed_forward` finds it on a module; :func:`check_not_parallelized` is the one
"already parallelized" check every style's ``check`` runs.

Example::

    >>> fwd = installed_forward(model.fc1)
    >>> fwd.input_layout
    Replicate()
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Placement

__all__ = ["ParallelForward", "check_not_parallelized", "installed_forward"]


class ParallelForward:
    """Base of the forwards shardwise installs (see the module docstring)."""

    group: ProcessGroup
    input_layout: Placement | None = None
    output_layout: Placement | None = None
    uneven_input_ok: bool = False

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def install(self, module: nn.Module) -> nn.Module:
        """Bind this forward to ``module`` as its ``forward`` method; returns ``module``."""
        module.forward = types.MethodType(self, module)
        return module


def installed_forward(module: nn.Module) -> ParallelForward | None:
    """The :class:`ParallelForward` installed on ``module``, or ``None``."""
    forward = getattr(module.__dict__.get("forward"), "__func__", None)
    return forward if isinstance(forward, ParallelForward) else None


def check_not_parallelized(module: nn.Module, fqn: str) -> None:
    """Raise (no communication) if ``module`` was parallelized already.

    Example::

        >>> check_not_parallelized(model.fc1, "fc1")
        Traceback (most recent call last):
        RuntimeError: 'fc1' is already parallelized (its weight is a DTensor).
    """
    if installed_forward(module) is not None or any(
        isinstance(p, DTensor) for p in module.parameters(recurse=False)
    ):
        raise RuntimeError(
            f"'{fqn or type(module).__name__}' is already parallelized (its weight is a DTensor)."
        )
