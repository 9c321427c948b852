"""The extension point: what every parallel style is and how a plan talks to it.

A style is a small value object. :func:`shardwise.expand_plan` asks each style of a
user's plan to :meth:`~ModuleStyle.expand` itself into *primitive* entries, one module
each (a composite such as ``PairwiseParallel`` on an MLP becomes a ``ColwiseParallel``
and a ``RowwiseParallel`` entry); ``parallelize_module`` then calls every entry's
:meth:`~ModuleStyle.check` (no communication) before any :meth:`~ModuleStyle.apply`.

Example::

    >>> class Replicated(ModuleStyle):
    ...     def check(self, module, fqn, mesh): ...
    ...     def apply(self, module, mesh): return module
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import Placement

from ..random import TensorParallelRNG

__all__ = [
    "ModuleStyle", "ParallelStyle", "PlanContext", "PlanMesh", "PrepareFn", "SharedRNG", "join_fqn",
]

PrepareFn = Callable[..., Any]


def join_fqn(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty.

    Example::

        >>> join_fqn("blocks.0", "mlp"), join_fqn("", "mlp"), join_fqn("blocks.0", "")
        ('blocks.0.mlp', 'mlp', 'blocks.0')
    """
    return f"{prefix}.{name}" if prefix and name else prefix or name


class ParallelStyle(ABC):
    """Base class of all styles: a pair of input/output preparation functions (the seed's).

    ``_prepare_input(input, device_mesh)`` returns a DTensor in the layout the module
    expects; ``_prepare_output(output, device_mesh)`` turns the module's DTensor result
    into what the caller receives. Subclass it and call ``super().__init__(f, g)``.

    Example::

        >>> class MyStyle(PairwiseParallel): ...
    """

    _prepare_input: PrepareFn | None
    _prepare_output: PrepareFn | None

    @abstractmethod
    def __init__(
        self, _prepare_input: PrepareFn | None, _prepare_output: PrepareFn | None
    ) -> None:
        self._prepare_input = _prepare_input
        self._prepare_output = _prepare_output

    def __repr__(self) -> str:
        def name(fn: PrepareFn | None) -> str:
            return "None" if fn is None else getattr(fn, "__name__", repr(fn))

        return (
            f"{type(self).__name__}(_prepare_input={name(self._prepare_input)}, "
            f"_prepare_output={name(self._prepare_output)})"
        )


class SharedRNG:
    """The one sharded dropout stream of a ``parallelize_module`` call, made on first use.

    Every dropout a plan shards draws from the same stream (so two layers never repeat
    each other's masks); it is seeded from ``torch.initial_seed()`` and the TP rank.
    """

    def __init__(self) -> None:
        self._rng: TensorParallelRNG | None = None

    def get(self, mesh: Any) -> TensorParallelRNG:
        """The :class:`~shardwise.random.TensorParallelRNG` for ``mesh`` (made once)."""
        if self._rng is None:
            self._rng = TensorParallelRNG(mesh, torch.initial_seed())
        return self._rng

    def __repr__(self) -> str:
        return "SharedRNG()"


@dataclass(frozen=True)
class PlanContext:
    """What a style may read while expanding: the TP size and the call's shared resources."""

    tp_size: int
    rng: SharedRNG = field(default_factory=SharedRNG)


@dataclass(frozen=True)
class PlanMesh:
    """A stand-in for a 1-D TP mesh during planning without one (``expand_plan``).

    :meth:`ModuleStyle.check` must not communicate, so the built-in checks read only
    ``mesh.size()``; this object answers that and nothing else.
    """

    tp_size: int

    def size(self, mesh_dim: int | None = None) -> int:
        return self.tp_size

    @property
    def ndim(self) -> int:
        return 1


class ModuleStyle(ParallelStyle):
    """A style that expands, validates and applies itself (the extension point).

    * :meth:`expand` returns the primitive entries the style stands for on a module
      (default: itself on that module);
    * :meth:`check` raises on anything that cannot work, without communicating and the
      same way on every rank; built-in checks read only ``mesh.size()``;
    * :meth:`apply` shards parameters and installs the forward; it may communicate and
      returns the module to register in place of the old one.

    An ``exclusive`` style (the default) owns the module's parameters, so no other plan
    entry may cover the same module; hook-only styles set ``exclusive = False``.

    Example::

        >>> class Replicated(ModuleStyle):
        ...     def check(self, module, fqn, mesh): ...
        ...     def apply(self, module, mesh): return module
    """

    exclusive: ClassVar[bool] = True

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        super().__init__(_prepare_input, _prepare_output)

    def expand(self, module: nn.Module, fqn: str, ctx: PlanContext) -> Mapping[str, ModuleStyle]:
        """The primitive entries this style stands for on ``module`` at ``fqn``.

        A primitive style returns ``{fqn: self}``; a composite one (PairwiseParallel,
        SequenceParallel) returns the entries of its submodules, possibly none.
        """
        return {fqn: self}

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (without communicating) if this style cannot apply to ``module``."""

    @abstractmethod
    def apply(self, module: Any, mesh: Any) -> Any:
        """Parallelize ``module`` on the 1-D ``mesh``; return the module to register."""

    def param_placements(self, module: Any) -> Mapping[str, Placement] | None:
        """The placement :meth:`apply` gives each of ``module``'s own parameters.

        ``None`` (the default) means "not declared". ``parallelize_module`` uses it to
        keep a tied parameter (an embedding shared with the output head) one parameter:
        the tie is kept when every module holding it declares the same placement for it.

        Example::

            >>> ColwiseParallel().param_placements(nn.Linear(4, 8))
            {'weight': Shard(dim=0), 'bias': Shard(dim=0)}
        """
        return None
