"""A module's own forward, run on the local shards of its DTensor parameters.

Most of a model's modules are not ``nn.Linear``: a per-head q/k norm, a MoE experts module
holding 3-D ``gate_up_proj``/``down_proj`` parameters, attention with per-head ``sinks``.
Their forward code is the model's own; what tensor parallelism changes is which slice of
each parameter a rank holds. When the module's math works slice by slice (each rank's
heads, each rank's share of the experts' intermediate features), the same code computes
this rank's part if it sees the local tensors instead of the DTensors.

:class:`LocalForward` does that: for the duration of the call, each DTensor parameter in
the module's own ``_parameters`` is replaced by its local leaf
(:func:`~shardwise._engine.local_params.local_param`, whose gradient lands on the DTensor
when backward ends), then the module's class ``forward`` runs. Optional ``enter`` and
``leave`` callables place the collectives around it (Megatron's *f* on an input that
sharded compute reads, *g* on a partial output), so a style states its whole contract in
one place.

Example::

    >>> distribute_parameter(experts, "gate_up_proj", mesh, StridedShard(1, split_factor=2))
    >>> distribute_parameter(experts, "down_proj", mesh, Shard(2))
    >>> LocalForward(mesh.get_group(), enter=copy_inputs, leave=reduce_output).install(experts)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Placement

from .forward import ParallelForward
from .local_params import local_param

__all__ = ["LocalForward", "local_parameters"]

Enter = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]
Leave = Callable[[Any], Any]


@contextlib.contextmanager
def local_parameters(
    module: nn.Module, summed: frozenset[str] = frozenset(), group: ProcessGroup | None = None
) -> Iterator[None]:
    """Within the block, ``module``'s own DTensor parameters read as their local shards.

    Only the module's direct parameters are swapped (children run their own forwards);
    the DTensors are put back however the block exits. ``summed`` names the parameters
    whose gradients are summed over ``group`` (see ``ParallelForward.summed``).

    Example::

        >>> with local_parameters(norm):
        ...     y = type(norm).forward(norm, x)   # norm.weight is this rank's tensor here
    """
    params = module._parameters
    swapped = {name: p for name, p in params.items() if isinstance(p, DTensor)}
    for name, p in swapped.items():
        params[name] = local_param(p, group if name in summed else None)  # type: ignore[assignment]
    try:
        yield
    finally:
        params.update(swapped)


class LocalForward(ParallelForward):
    """The module's class ``forward`` on local shards, between optional collectives.

    Args:
        group: the TP process group.

    Keyword Args:
        enter: ``(args, kwargs) -> (args, kwargs)`` before the forward (e.g. *f* on the
            inputs that sharded compute reads).
        leave: ``output -> output`` after it (e.g. *g* on a partial sum).
        input_layout, output_layout: what the forward declares for tools such as
            :func:`shardwise.debug.check_layouts` (``None``: not declared).
        summed: the parameters distributed with ``sum_grads=True`` (their gradients are
            summed over ``group``; said again here so a moved model keeps the sum).
        label: a short description for ``repr`` (the style that installed it).
    """

    def __init__(
        self,
        group: ProcessGroup,
        *,
        enter: Enter | None = None,
        leave: Leave | None = None,
        input_layout: Placement | None = None,
        output_layout: Placement | None = None,
        summed: frozenset[str] = frozenset(),
        label: str = "",
    ) -> None:
        self.group = group
        self.summed = summed
        self.enter, self.leave = enter, leave
        self.input_layout, self.output_layout = input_layout, output_layout
        self.label = label

    def __repr__(self) -> str:
        return f"LocalForward({self.label})" if self.label else "LocalForward()"

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.enter is not None:
            args, kwargs = self.enter(args, kwargs)
        with local_parameters(module, self.summed, self.group):
            out = type(module).forward(module, *args, **kwargs)
        return out if self.leave is None else self.leave(out)
