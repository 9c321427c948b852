"""``PrepareModuleInput`` / ``PrepareModuleOutput``: relabel and redistribute at a module boundary.

These styles shard nothing; they install a forward pre-hook (inputs) or forward hook
(outputs) that treats each plain tensor as this rank's piece in a given layout and
redistributes it to the desired one, as torch 2.x's styles of the same names do. Plain
tensors move with one local collective each (:mod:`shardwise._engine.redistribute`):

===========================  ==========================  ==========================================
transition                   forward                     backward
===========================  ==========================  ==========================================
``Shard(d)`` -> Replicate    all-gather on d             reduce-scatter (DTensor result, gradient
                                                         placement ``Partial``) or split (local)
Replicate -> ``Shard(d)``    split on d                  all-gather on d
Partial -> Replicate         all-reduce                  none
Partial -> ``Shard(d)``      reduce-scatter on d         all-gather on d
same layout                  none                        none
===========================  ==========================  ==========================================

A local (``use_local_output=True``) replicated result promises its consumers' full
gradient, so its gather splits the gradient; a DTensor result says its gradient may be
``Partial`` (column-parallel consumers such as :class:`~shardwise.style.ColwiseParallel`
return exactly that), so one reduce-scatter both sums and splits it. ``None`` in a
layout tuple leaves that argument alone. DTensor arguments are redistributed by DTensor.

Example::

    >>> parallelize_module(block, mesh, {
    ...     "attn": PrepareModuleInput(input_layouts=(Shard(1), None),
    ...                                desired_input_layouts=(Replicate(), None)),
    ...     "attn.q": ColwiseParallel(), "attn.o": RowwiseParallel(output_layouts=Shard(1))})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Shard

from .._engine.io import as_placement, normalize
from .._engine.redistribute import global_shape, local_redistribute, wrap
from .base import ModuleStyle

__all__ = ["PrepareModuleInput", "PrepareModuleInputOutput", "PrepareModuleOutput"]

Layouts = Placement | tuple[Placement | None, ...] | None


def _layout_tuple(value: Layouts, what: str) -> tuple[Placement | None, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, tuple) else (value,)
    return tuple(as_placement(p, what) for p in items)


def _layout_dict(value: Mapping[str, Placement] | None, what: str) -> dict[str, Placement | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict from argument name to Placement, got {value!r}")
    return {key: as_placement(p, f"{what}[{key!r}]") for key, p in value.items()}


def _check_arg(x: Any, layout: Placement | None, what: str) -> None:
    if layout is not None and not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{what}: expecting a torch.Tensor for layout {layout}, got {type(x).__name__}"
        )


def _convert(
    x: Any, src: Placement | None, dst: Placement | None, mesh: DeviceMesh, use_local: bool
) -> Any:
    """``x`` labelled ``src`` and redistributed to ``dst`` (``None``: unchanged)."""
    if src is None:
        return x
    if isinstance(x, DTensor):
        dt = x if dst is None or src == dst else x.redistribute(mesh, [dst])
        return dt.to_local() if use_local else dt
    src = normalize(src, x.ndim)
    dst = src if dst is None else normalize(dst, x.ndim)
    shape = global_shape(x, src, mesh.size())
    if src == dst:
        return x if use_local else wrap(x, mesh, src, shape)
    # A DTensor result may get a Partial gradient back; a plain one gets the full gradient.
    partial = not use_local and type(src) is Shard and dst.is_replicate()
    local = local_redistribute(x, mesh.get_group(), src, dst, partial_grad=partial)
    if local is None:
        dt = wrap(x, mesh, src, shape).redistribute(mesh, [dst])
        return dt.to_local() if use_local else dt
    if use_local:
        return local
    return wrap(local, mesh, dst, shape, grad_placements=[Partial()] if partial else None)


class PrepareModuleInput(ModuleStyle):
    """Label a module's input tensors with layouts and redistribute them before it runs.

    * Input: each plain tensor is this rank's piece in ``input_layouts`` (``None``: left alone).
    * Output (what the module receives): ``desired_input_layouts``, as DTensors
      (default) or local tensors (``use_local_output=True``).
    * Forward: one collective per argument whose layout changes (table in
      :mod:`shardwise.styles.prepare`). Backward: the mirror collective.

    Keyword Args:
        input_layouts: a placement or a tuple, one entry per positional argument.
        desired_input_layouts: same length as ``input_layouts``.
        input_kwarg_layouts / desired_input_kwarg_layouts: the same for keyword arguments.
        use_local_output: hand the module local tensors instead of DTensors.

    Example::

        >>> parallelize_module(model, mesh, {"attn": PrepareModuleInput(
        ...     input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))})
    """

    exclusive = False

    def __init__(
        self,
        *,
        input_layouts: Layouts = None,
        desired_input_layouts: Layouts = None,
        input_kwarg_layouts: Mapping[str, Placement] | None = None,
        desired_input_kwarg_layouts: Mapping[str, Placement] | None = None,
        use_local_output: bool = False,
    ) -> None:
        super().__init__()
        self.input_layouts = _layout_tuple(input_layouts, "input_layouts")
        self.desired_input_layouts = _layout_tuple(desired_input_layouts, "desired_input_layouts")
        if self.input_layouts is not None:
            if self.desired_input_layouts is None:
                raise ValueError("desired module inputs should not be None!")
            if len(self.input_layouts) != len(self.desired_input_layouts):
                raise ValueError("input_layouts and desired_input_layouts should have same length!")
        self.with_kwargs = input_kwarg_layouts is not None
        self.input_kwarg_layouts = _layout_dict(input_kwarg_layouts, "input_kwarg_layouts")
        self.desired_input_kwarg_layouts = _layout_dict(
            desired_input_kwarg_layouts, "desired_input_kwarg_layouts"
        )
        if self.with_kwargs and len(self.input_kwarg_layouts) != len(
            self.desired_input_kwarg_layouts
        ):
            raise ValueError(
                "input_kwarg_layouts and desired_input_kwarg_layouts should have same length!"
            )
        self.use_local_output = use_local_output

    def prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], mesh: DeviceMesh, name: str = "module"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` in the desired layouts. Validates every argument first.

        Example::

            >>> args, kwargs = style.prepare((x_shard,), {}, mesh)
        """
        pairs: list[tuple[Placement | None, Placement | None]] = [(None, None)] * len(args)
        if self.input_layouts is not None:
            if len(args) != len(self.input_layouts):
                raise ValueError(
                    f"{name}: module inputs and input_layouts should have same length! "
                    f"({len(args)} inputs, {len(self.input_layouts)} layouts)"
                )
            pairs = list(zip(self.input_layouts, self.desired_input_layouts or ()))
        kw_pairs = {
            k: (self.input_kwarg_layouts.get(k), self.desired_input_kwarg_layouts.get(k))
            for k in kwargs
        }
        for i, (x, (src, _)) in enumerate(zip(args, pairs)):
            _check_arg(x, src, f"{name} input {i}")
        for k, (src, _) in kw_pairs.items():
            _check_arg(kwargs[k], src, f"{name} input {k!r}")
        local = self.use_local_output
        new_args = tuple(_convert(x, s, d, mesh, local) for x, (s, d) in zip(args, pairs))
        new_kwargs = {k: _convert(kwargs[k], s, d, mesh, local) for k, (s, d) in kw_pairs.items()}
        return new_args, new_kwargs

    def apply(self, module: Any, mesh: Any) -> Any:
        """Register the forward pre-hook on ``module``; returns it."""
        name = type(module).__name__

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return self.prepare(args, kwargs, mesh, name)

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts}, "
            f"desired_input_layouts={self.desired_input_layouts}, "
            f"input_kwarg_layouts={self.input_kwarg_layouts}, "
            f"desired_input_kwarg_layouts={self.desired_input_kwarg_layouts}, "
            f"use_local_output={self.use_local_output})"
        )


class PrepareModuleOutput(ModuleStyle):
    """Label a module's output tensors with layouts and redistribute them after it runs.

    * Input (what the module returned): each plain tensor is this rank's piece in
      ``output_layouts`` (``None``: left alone).
    * Output: ``desired_output_layouts``, as local tensors (default) or DTensors. A
      single output is returned bare, as in torch.
    * Forward: one collective per output whose layout changes. Backward: the mirror.

    Keyword Args:
        output_layouts: a placement or a tuple, one entry per output.
        desired_output_layouts: same length as ``output_layouts``.
        use_local_output: return local tensors (default) instead of DTensors.

    Example::

        >>> parallelize_module(model, mesh, {"norm": PrepareModuleOutput(
        ...     output_layouts=Shard(1), desired_output_layouts=Replicate())})
    """

    exclusive = False

    def __init__(
        self,
        *,
        output_layouts: Placement | tuple[Placement | None, ...],
        desired_output_layouts: Placement | tuple[Placement, ...],
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        self.output_layouts = _layout_tuple(output_layouts, "output_layouts") or ()
        self.desired_output_layouts = (
            _layout_tuple(desired_output_layouts, "desired_output_layouts") or ()
        )
        if len(self.output_layouts) != len(self.desired_output_layouts):
            raise ValueError("output_layouts and desired_output_layouts should have same length!")
        self.use_local_output = use_local_output

    def prepare(self, outputs: Any, mesh: DeviceMesh, name: str = "module") -> Any:
        """``outputs`` in the desired layouts (a single output returned bare).

        Example::

            >>> y_full = style.prepare(y_shard, mesh)
        """
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        if len(outs) != len(self.output_layouts):
            raise ValueError(
                f"{name}: module outputs and output_layouts should have same length! "
                f"({len(outs)} outputs, {len(self.output_layouts)} layouts)"
            )
        for i, (y, src) in enumerate(zip(outs, self.output_layouts)):
            _check_arg(y, src, f"{name} output {i}")
        prepared = tuple(
            _convert(y, s, d, mesh, self.use_local_output)
            for y, s, d in zip(outs, self.output_layouts, self.desired_output_layouts)
        )
        return prepared[0] if len(prepared) == 1 else prepared

    def apply(self, module: Any, mesh: Any) -> Any:
        """Register the forward hook on ``module``; returns it."""
        name = type(module).__name__

        def hook(_: nn.Module, args: Any, outputs: Any) -> Any:
            return self.prepare(outputs, mesh, name)

        module.register_forward_hook(hook)
        return module

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_layouts={self.output_layouts}, "
            f"desired_output_layouts={self.desired_output_layouts}, "
            f"use_local_output={self.use_local_output})"
        )


class PrepareModuleInputOutput(ModuleStyle):
    """:class:`PrepareModuleInput` and :class:`PrepareModuleOutput` on one module.

    Input/output placements and collectives: those of the two parts.
    ``use_local_input`` is the input part's ``use_local_output``.

    Example::

        >>> parallelize_module(model, mesh, {"attn": PrepareModuleInputOutput(
        ...     input_layouts=Shard(1), desired_input_layouts=Replicate(),
        ...     output_layouts=Replicate(), desired_output_layouts=Shard(1))})
    """

    exclusive = False

    def __init__(
        self,
        *,
        input_layouts: Layouts = None,
        desired_input_layouts: Layouts = None,
        input_kwarg_layouts: Mapping[str, Placement] | None = None,
        desired_input_kwarg_layouts: Mapping[str, Placement] | None = None,
        use_local_input: bool = False,
        output_layouts: Placement | tuple[Placement | None, ...],
        desired_output_layouts: Placement | tuple[Placement, ...],
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        self.prepare_module_input = PrepareModuleInput(
            input_layouts=input_layouts,
            desired_input_layouts=desired_input_layouts,
            input_kwarg_layouts=input_kwarg_layouts,
            desired_input_kwarg_layouts=desired_input_kwarg_layouts,
            use_local_output=use_local_input,
        )
        self.prepare_module_output = PrepareModuleOutput(
            output_layouts=output_layouts,
            desired_output_layouts=desired_output_layouts,
            use_local_output=use_local_output,
        )

    def apply(self, module: Any, mesh: Any) -> Any:
        """Register both hooks on ``module``; returns it."""
        self.prepare_module_input.apply(module, mesh)
        return self.prepare_module_output.apply(module, mesh)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.prepare_module_input!r}, {self.prepare_module_output!r})"
        )
