"""``parallelize_module``: resolve a plan, validate all of it, then shard.

The plan is expanded into its flat per-module form (:func:`shardwise.expand_plan`), every
entry is checked without communicating (unknown keys, wrong types, odd MLPs, indivisible
sizes, bad meshes, tied parameters the plan would untie), and only when the whole plan
is valid are the entries applied, so a bad plan fails the same way on every rank instead
of leaving some ranks waiting in a collective.

Example::

    >>> model = parallelize_module(model, mesh, {"mlp.fc1": ColwiseParallel(),
    ...                                          "mlp.fc2": RowwiseParallel()})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .mesh import default_mesh, tp_submesh
from .planning.agreement import RefuseDDP, agree_on_plan, check_not_wrapped
from .planning.auto import auto_plan
from .planning.expand import Plan, check_entries, expand_entries
from .planning.ties import check_ties, retie
from .styles.base import ParallelStyle, PlanContext

__all__ = ["Plan", "parallelize_module"]


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
    if isinstance(module, nn.Module):
        check_not_wrapped(module)  # DDP/FSDP must wrap the parallelized model, not the reverse
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

    entries = expand_entries(module, parallelize_plan, PlanContext(tp_mesh.size()))
    check_entries(entries, tp_mesh)
    owned = {
        id(e.module): (e.fqn, e.style.param_placements(e.module))
        for e in entries
        if e.style.exclusive
    }
    ties = check_ties(module, owned)  # the last check: nothing has moved yet

    # One small all-gather: every rank holds the same entries, or every rank raises.
    root = module
    for entry in agree_on_plan(module, entries, tp_mesh):
        new = entry.style.apply(entry.module, tp_mesh)
        if new is not entry.module:
            root = _set_submodule(root, entry.fqn, new)
    retie(ties)
    root.__dict__["_ddp_params_and_buffers_to_ignore"] = RefuseDDP()  # DDP cannot sync it: raises
    return root
