"""The engine's vocabulary for a module's input and output: layouts, not functions.

Every style's input/output handling reduces to a :class:`ModuleIO` of placements (the
seed's ``make_*`` functions are translated once, in :mod:`shardwise.layouts`); the
installed forwards read only this.

Example::

    >>> ModuleIO(Shard(0), Shard(0))   # sequence-sharded in and out, local tensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.distributed.tensor import Placement, Shard

__all__ = ["ModuleIO", "PrepareFn", "as_placement", "normalize"]

PrepareFn = Callable[..., Any]


@dataclass(frozen=True)
class ModuleIO:
    """What a parallelized module does with its input and its output.

    * ``input_layout``: how a plain input tensor is laid out across ranks (``None``: it is
      used exactly as given). The module redistributes it to the layout it computes on.
    * ``output_layout`` / ``use_local_output``: the layout the result is redistributed
      to, and whether the caller gets its local tensor or the DTensor.
    * ``input_fn`` / ``output_fn``: a user's own seed-style function with no placement
      equivalent; it runs on DTensors (slower, same values).
    * ``save_gathered_input``: a column layer fed a sequence shard saves the gathered
      input for backward (no extra collective, t times the memory) instead of the shard,
      which it all-gathers again in backward (Megatron-LM's scheme, the default).

    Example::

        >>> ModuleIO(Shard(0), Shard(0))   # sequence-sharded in and out, local tensors
    """

    input_layout: Placement | None
    output_layout: Placement
    use_local_output: bool = True
    input_fn: PrepareFn | None = None
    output_fn: PrepareFn | None = None
    save_gathered_input: bool = False


def as_placement(value: Any, what: str) -> Placement | None:
    """A layout keyword as one ``Placement``: a placement, a 1-tuple of one, or ``None``.

    Example::

        >>> as_placement((Shard(1),), "input_layouts")
        Shard(dim=1)
    """
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if value is None or isinstance(value, Placement):
        return value
    raise TypeError(
        f"{what} must be a torch.distributed.tensor Placement (Replicate(), Shard(d), "
        f"Partial()) or a 1-tuple of one, got {value!r}"
    )


def normalize(placement: Placement, ndim: int) -> Placement:
    """``placement`` with a negative shard dimension made non-negative for an ``ndim`` tensor.

    Example::

        >>> normalize(Shard(-1), 3)
        Shard(dim=2)
    """
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim % ndim)
    return placement
