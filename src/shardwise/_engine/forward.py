"""The one protocol of a parallelized module's forward.

Every forward shardwise installs on a module (column/row Linear, Embedding, Conv1D,
head-sliced projections) is a :class:`ParallelForward` bound to the module as its
``forward`` method. It declares what tools read without knowing each kind:

* ``group``: the TP process group it communicates over;
* ``input_layout``: how a plain input must be laid out across the group (``None``: not
  declared, e.g. a user's own seed-style function decides);
* ``output_layout``: the layout the caller receives (``None``: not declared).

:func:`installed_forward` finds it on a module; :func:`check_installable` is the check
every style's ``check`` runs: not parallelized already, and a subclass's own forward kept.

A subclass that overrides ``forward`` (Gemma's scaled word embedding multiplies
``super().forward(ids)`` by ``embed_scale``) keeps its computation: the module's class
becomes a subclass of its own class with the parallel forward in the place of the base
class's, so the subclass's ``super().forward(...)`` runs sharded and the rest of its
forward runs as written. A subclass whose forward never calls ``super()`` is refused by
name, before anything moves: there is no base forward in it to parallelize.

Example::

    >>> fwd = installed_forward(model.fc1)
    >>> fwd.input_layout
    Replicate()
"""

from __future__ import annotations

import types
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Placement

from .local_params import local_param

__all__ = [
    "ParallelForward",
    "check_installable",
    "check_not_parallelized",
    "installed_forward",
    "original_class",
]

# Where a kept subclass forward finds the parallel forward (see _interposer).
_SLOT = "_shardwise_forward"


class ParallelForward:
    """Base of the forwards shardwise installs (see the module docstring)."""

    group: ProcessGroup
    input_layout: Placement | None = None
    output_layout: Placement | None = None
    # The class whose forward this one computes (nn.Linear, nn.Embedding, ...); a
    # subclass's own forward around it is kept. None: replace whatever forward is there.
    base: ClassVar[type[nn.Module] | None] = None
    # The module's parameters whose gradients are summed over ``group`` (replicated weights
    # applied to sharded activations). The forward holds this, not the parameter, so it
    # survives ``module.to(...)`` and ``to_empty``, which swap the local tensors.
    summed: frozenset[str] = frozenset()

    def param(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """``module``'s parameter ``name`` as the local tensor to compute with.

        Example::

            >>> w = self.param(module, "weight")
        """
        return local_param(module._parameters.get(name), self.group if name in self.summed else None)

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def install(self, module: nn.Module, base: type[nn.Module] | None = None) -> nn.Module:
        """Make this the forward of ``module`` (of its ``base`` class part); returns ``module``.

        Example::

            >>> ColumnLinearForward(mesh, io, fc1).install(fc1)
        """
        base = base or self.base
        if base is not None and _overrides_forward(type(module), base):
            module.__class__ = _keeping_forward(type(module), base)
            module.__dict__[_SLOT] = types.MethodType(self, module)
        else:
            module.forward = types.MethodType(self, module)
        return module


def installed_forward(module: nn.Module) -> ParallelForward | None:
    """The :class:`ParallelForward` installed on ``module``, or ``None``."""
    for slot in ("forward", _SLOT):
        forward = getattr(module.__dict__.get(slot), "__func__", None)
        if isinstance(forward, ParallelForward):
            return forward
    return None


def original_class(module: nn.Module) -> type[nn.Module]:
    """``module``'s class as the model defined it (before a kept forward was interposed).

    Example::

        >>> original_class(gemma.model.embed_tokens).__name__
        'GemmaTextScaledWordEmbedding'
    """
    cls = type(module)
    return getattr(cls, "_shardwise_original", cls) if cls in _KEEPING.values() else cls


def check_installable(module: nn.Module, fqn: str, base: type[nn.Module], style: str) -> None:
    """Raise (no communication) unless a parallel ``base`` forward can go into ``module``.

    ``module`` must not be parallelized already, and if its class overrides ``base``'s
    forward, that forward must call ``super()`` (its own computation is kept around the
    parallel one).

    Example::

        >>> check_installable(model.embed_tokens, "embed_tokens", nn.Embedding, "RowwiseParallel")
    """
    name = fqn or type(module).__name__
    check_not_parallelized(module, name)
    cls = type(module)
    if _overrides_forward(cls, base) and not _calls_super(cls.forward):
        raise TypeError(
            f"{name}: {style} cannot keep {cls.__qualname__}.forward: it overrides "
            f"{base.__name__}.forward without calling super().forward(...), so there is no "
            f"{base.__name__} forward in it to parallelize. Leave '{name}' out of the plan "
            "(replicated) or give it a style of its own."
        )


def _overrides_forward(cls: type[nn.Module], base: type[nn.Module]) -> bool:
    return issubclass(cls, base) and cls.forward is not base.forward


def _calls_super(forward: Any) -> bool:
    code = getattr(forward, "__code__", None)
    return code is not None and "super" in code.co_names


# Process-wide caches of generated classes (one per base / per model class): classes, not
# state, so two meshes or two models never interfere.
_INTERPOSERS: dict[type[nn.Module], type[nn.Module]] = {}
_KEEPING: dict[type[nn.Module], type[nn.Module]] = {}


def _interposer(base: type[nn.Module]) -> type[nn.Module]:
    """A ``base`` subclass whose ``forward`` runs the parallel forward installed on the module."""
    cls = _INTERPOSERS.get(base)
    if cls is None:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.__dict__[_SLOT](*args, **kwargs)

        cls = type(f"_Parallel{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
        _INTERPOSERS[base] = cls
    return cls


def _keeping_forward(cls: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with the parallel forward between it and ``base`` in the method order.

    The MRO is ``cls, ..., _Parallel<base>, base``: the subclass's ``super().forward``
    reaches the parallel forward, and the class keeps its name for the model's own code.
    """
    new = _KEEPING.get(cls)
    if new is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_shardwise_original": cls,
        }
        new = type(cls.__name__, (cls, _interposer(base)), namespace)
        _KEEPING[cls] = new
    return new


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
