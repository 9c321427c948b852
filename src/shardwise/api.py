"""``parallelize_module``: resolve a plan, validate all of it, then shard.

Planning walks the module tree without communicating and raises on anything it cannot
do (unknown keys, wrong types, odd MLPs, indivisible sizes, bad meshes, tied parameters
the plan would untie). Only when the
whole plan is valid does it scatter weights, so a bad plan fails the same way on every
rank instead of leaving some ranks waiting in a collective.

Example::

    >>> model = parallelize_module(model, mesh, {"mlp.fc1": ColwiseParallel(),
    ...                                          "mlp.fc2": RowwiseParallel()})
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate

from .auto import auto_plan
from .mesh import default_mesh, tp_submesh
from .multihead_attention_tp import (
    TensorParallelMultiheadAttention,
    check_attention,
    parallelize_attention,
)
from .pairwise import (
    dropouts_inside_pairs,
    is_mlp,
    is_transformer_layer,
    plan_mlp,
    shard_sequence_io,
)
from .random import TensorParallelRNG, shard_dropout
from .sequence_norm import check_norm, is_norm, shard_norm
from .sharded_linear import linear_placements, shard_linear
from .style import ModuleStyle, ParallelStyle, SequenceParallel
from .ties import check_ties, retie

__all__ = ["Plan", "parallelize_module"]

Plan = ParallelStyle | Mapping[str, Any]
ATTENTION_TYPES = (nn.MultiheadAttention, TensorParallelMultiheadAttention)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class _Step:
    """One deferred action: ``apply()`` returns the module to register at ``fqn``."""

    fqn: str
    module: nn.Module
    apply: Callable[[], nn.Module]


@dataclass
class _Planner:
    mesh: DeviceMesh
    steps: list[_Step] = field(default_factory=list)
    claimed: dict[int, str] = field(default_factory=dict)
    # Modules whose parameters the plan replaces, with the placements their styles declare.
    owned: dict[int, tuple[str, Mapping[str, Placement] | None]] = field(default_factory=dict)
    _rng: TensorParallelRNG | None = None

    @property
    def rng(self) -> TensorParallelRNG:
        """The sharded dropout stream for this call, seeded from ``torch.initial_seed()``."""
        if self._rng is None:
            self._rng = TensorParallelRNG(self.mesh, torch.initial_seed())
        return self._rng

    def shard_dropouts(self, modules: list[tuple[str, nn.Module]]) -> None:
        for fqn, module in modules:
            self.claim(module, fqn)
            self.steps.append(_Step(fqn, module, functools.partial(shard_dropout, module, self.rng)))

    @property
    def world(self) -> int:
        return self.mesh.size()

    def own(self, module: nn.Module, fqn: str, placements: Mapping[str, Placement] | None) -> None:
        """Claim ``module`` for a style that replaces its parameters (see :mod:`.ties`)."""
        self.claim(module, fqn)
        self.owned[id(module)] = (fqn, placements)

    def claim(self, module: nn.Module, fqn: str) -> None:
        previous = self.claimed.get(id(module))
        if previous is not None:
            raise ValueError(
                f"'{fqn or type(module).__name__}' is covered by two plan entries "
                f"(also as '{previous or type(module).__name__}'); give each module one style."
            )
        self.claimed[id(module)] = fqn

    # -- single style ---------------------------------------------------------------
    def plan_style(self, module: nn.Module, fqn: str, style: ParallelStyle) -> int:
        """Plan ``style`` on ``module``; returns how many modules it will shard."""
        if isinstance(style, ModuleStyle):
            # Colwise/Rowwise (Linear, Embedding), PrepareModule*, and users' own styles.
            style.check(module, fqn, self.mesh)
            if style.exclusive:
                self.own(module, fqn, style.param_placements(module))
            target, mesh = module, self.mesh
            self.steps.append(_Step(fqn, module, lambda: style.apply(target, mesh)))
            return 1
        if isinstance(style, SequenceParallel) and is_norm(module):
            check_norm(module, fqn)
            self.own(module, fqn, {"weight": Replicate(), "bias": Replicate()})
            norm, mesh = module, self.mesh
            self.steps.append(_Step(fqn, module, lambda: shard_norm(norm, mesh)))
            return 1
        if isinstance(module, ATTENTION_TYPES):
            check_attention(module, fqn, self.world)
            self.own(module, fqn, None)
            attn, mesh, rng = module, self.mesh, self.rng
            self.steps.append(
                _Step(fqn, module, lambda: _with_rng(parallelize_attention(attn, mesh, style), rng))
            )
            return 1
        if isinstance(style, SequenceParallel) and isinstance(module, DROPOUT_TYPES):
            self.shard_dropouts([(fqn, module)])
            return 1
        if is_mlp(module):
            specs = plan_mlp(module, fqn, style, self.world)  # type: ignore[arg-type]
            self.shard_dropouts(
                [(_join(fqn, name), m) for name, m in dropouts_inside_pairs(module)]
            )
            for spec in specs:
                self.own(spec.module, spec.fqn, linear_placements(spec.role))
                self.steps.append(
                    _Step(spec.fqn, spec.module, _linear_step(spec, self.mesh))
                )
            if isinstance(style, SequenceParallel) and is_transformer_layer(module):
                layer, mesh = module, self.mesh
                self.steps.append(_Step(fqn, module, lambda: _with(layer, shard_sequence_io, mesh)))
            return len(specs)
        return sum(
            self.plan_style(child, _join(fqn, name), style)
            for name, child in module.named_children()
        )

    # -- dict plans -----------------------------------------------------------------
    def plan_dict(self, root: nn.Module, prefix: str, plan: Mapping[str, Any]) -> None:
        for key, value in plan.items():
            if not isinstance(key, str):
                raise RuntimeError(
                    f"parallelize_plan keys must be module FQN strings, got {key!r} "
                    f"({type(key).__name__})."
                )
            for fqn, module in _resolve(root, key):
                full = _join(prefix, fqn)
                if isinstance(value, Mapping):
                    self.plan_dict(module, full, value)
                elif isinstance(value, ParallelStyle):
                    self.plan_top(module, full, value)
                else:
                    raise RuntimeError(
                        "Expect Union[ParallelStyle, Dict[str, ParallelStyle]] for "
                        f"parallelize_plan['{key}'], {type(value)} found!"
                    )

    def plan_top(self, module: nn.Module, fqn: str, style: ParallelStyle) -> None:
        if self.plan_style(module, fqn, style) == 0:
            raise RuntimeError(
                f"{type(style).__name__} found nothing to parallelize in "
                f"'{fqn or type(module).__name__}' ({type(module).__name__}): it applies to an "
                "MLP with an even number of direct nn.Linear children, nn.MultiheadAttention, "
                "or nn.Transformer and its layers."
            )


def _with(module: nn.Module, fn: Callable[[nn.Module, DeviceMesh], None], mesh: DeviceMesh) -> nn.Module:
    fn(module, mesh)
    return module


def _with_rng(module: nn.Module, rng: TensorParallelRNG) -> nn.Module:
    """Attach the sharded dropout stream to a module that draws per-rank masks."""
    module._shardwise_rng = rng  # type: ignore[assignment]
    return module


def _linear_step(spec: Any, mesh: DeviceMesh) -> Callable[[], nn.Module]:
    return lambda: shard_linear(spec.module, mesh, spec.role, spec.prepare_input, spec.prepare_output)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _resolve(root: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """Every submodule matching ``key``; atoms may be fnmatch globs (``layers.*.mlp``)."""
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
            nxt.extend((_join(path, n), children[n]) for n in names)
        if not nxt:
            where = matches[0][0] or type(root).__name__
            owner = type(matches[0][1]).__name__
            raise AttributeError(
                f"{owner} has no attribute `{atom}` (plan key '{key}' matches no submodule "
                f"of '{where}')"
            )
        matches = nxt
    return matches


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    if fqn == "":
        return new
    parent_fqn, _, name = fqn.rpartition(".")
    parent = root.get_submodule(parent_fqn) if parent_fqn else root
    if getattr(parent, name) is not new:
        setattr(parent, name, new)
    return root


def parallelize_module(
    module: nn.Module,
    device_mesh: DeviceMesh | Plan | Literal["auto"] | None = None,
    parallelize_plan: Plan | Literal["auto"] | None = None,
    tp_mesh_dim: int = 0,
) -> nn.Module:
    """Apply tensor parallelism to ``module`` following ``parallelize_plan``.

    Args:
        module: the model (or submodule) to parallelize. Works in place, except that an
            ``nn.MultiheadAttention`` given as the module itself is replaced: use the
            return value.
        device_mesh: the mesh. An n-D mesh is reduced to this rank's 1-D slice along
            ``tp_mesh_dim``; the other dimensions are left for data parallelism. If it
            is omitted (``parallelize_module(m, PairwiseParallel())``), a 1-D mesh over
            the default process group is used.
        parallelize_plan: one :class:`ParallelStyle` for the whole module, or a dict
            from FQN (atoms may be globs such as ``"layers.*.mlp"``) to a style or a
            nested dict. A key that matches nothing is an error. ``"auto"`` applies
            :func:`shardwise.auto_plan` (e.g. to a Hugging Face model).
        tp_mesh_dim: the mesh dimension to shard over; must lie in ``[-ndim, ndim)``.

    Weights are taken from TP-mesh coordinate 0 and scattered; what other ranks held is
    discarded. All validation happens before the first collective.

    Example::

        >>> mesh = init_device_mesh("cpu", (2,))
        >>> model = parallelize_module(model, mesh, PairwiseParallel())
    """
    if isinstance(device_mesh, (ParallelStyle, Mapping, str)) and parallelize_plan is None:
        device_mesh, parallelize_plan = None, device_mesh
    if parallelize_plan == "auto":
        mesh = default_mesh() if device_mesh is None else device_mesh
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"device_mesh must be a DeviceMesh, got {type(mesh).__name__}")
        size = tp_submesh(mesh, tp_mesh_dim).size()
        return parallelize_module(module, mesh, auto_plan(module, tp_size=size), tp_mesh_dim)
    if not isinstance(module, nn.Module):
        raise TypeError(f"parallelize_module expects an nn.Module, got {type(module).__name__}")
    if isinstance(parallelize_plan, type):
        raise RuntimeError(
            "Expect Union[ParallelStyle, Dict[str, ParallelStyle]] for parallelize_plan, "
            f"{parallelize_plan} found! (a style class; instantiate it, e.g. "
            f"{parallelize_plan.__name__}())"
        )
    if not isinstance(parallelize_plan, (ParallelStyle, Mapping)):
        raise RuntimeError(
            "Expect Union[ParallelStyle, Dict[str, ParallelStyle]] for parallelize_plan, "
            f"{type(parallelize_plan)} found!"
        )
    mesh = default_mesh() if device_mesh is None else device_mesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a DeviceMesh, got {type(mesh).__name__}")
    tp_mesh = tp_submesh(mesh, tp_mesh_dim)

    planner = _Planner(tp_mesh)
    if isinstance(parallelize_plan, ParallelStyle):
        planner.plan_top(module, "", parallelize_plan)
    else:
        planner.plan_dict(module, "", parallelize_plan)

    ties = check_ties(module, planner.owned)  # the last check: nothing has moved yet

    root = module
    for step in planner.steps:
        new = step.apply()
        if new is not step.module:
            root = _set_submodule(root, step.fqn, new)
    retie(ties)
    return root
