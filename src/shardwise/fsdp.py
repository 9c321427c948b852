"""2-D parallelism: tensor parallel inside each data-parallel (FSDP) replica.

A 2-D mesh ``[[0, 1], [2, 3]]`` named ``("dp", "tp")`` runs tensor parallelism along its
rows and FSDP along its columns. Parameters that :func:`~shardwise.parallelize_module`
sharded are ``nn.Parameter(DTensor)`` on the row (``mesh2d["tp"]``); FSDP then shards
them once more over the column (``mesh2d["dp"]``) and averages their gradients over it.

Torch 2.13 needs no global switch for this (see :func:`enable_2d_with_fsdp`):

* FSDP1: ``FSDP(model, device_mesh=mesh2d["dp"], use_orig_params=True)`` (on CPU also
  ``device_id=torch.device("cpu")``). Given a mesh sliced from a larger one, FSDP builds
  its own DTensor extension, which flattens each DTensor's local shard and re-wraps the
  unsharded views as DTensors on the TP mesh.
* FSDP2: ``fully_shard(model, mesh=mesh2d["dp"])`` composes with DTensor natively; its
  sharded parameters are DTensors on the 2-D mesh. :func:`parallelize_2d` does both steps.

Example::

    >>> mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    >>> model = parallelize_2d(MLP(), mesh2d, PairwiseParallel())
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ._engine.torch_compat import check_fsdp_extension_machinery
from .api import Plan, parallelize_module

__all__ = ["enable_2d_with_fsdp", "parallelize_2d"]

_WARNING = "2D parallelism won't work with FSDP"


def enable_2d_with_fsdp() -> bool:
    """Check that FSDP can wrap a tensor-parallel model; ``True`` if it can.

    The seed (torch 2.0) installed a process-global ``DTensorExtensions`` through FSDP's
    private ``_set_fsdp_extensions``. On torch 2.13 that global is written but never read,
    so this function installs nothing and changes no state. It only checks, by importing
    them, that the pieces the 2-D path uses exist: FSDP's extension module
    (``FSDPExtensions`` and its flatten/unflatten hooks), the per-instance
    ``_init_extension`` that FSDP1 runs when its ``device_mesh`` is a slice of a larger
    mesh, ``DeviceMesh._get_root_mesh``, FSDP1's ``device_mesh=`` argument and FSDP2's
    ``fully_shard``. If any check fails it warns ``"2D parallelism won't work with FSDP"``
    (with the reason) and returns ``False``. Calling it is optional and idempotent.

    What makes FSDP1 shard DTensor parameters is passing the sliced mesh:
    ``FSDP(model, device_mesh=mesh2d["dp"], use_orig_params=True)`` (plus
    ``device_id=torch.device("cpu")`` on CPU). The 2.0-style ``process_group=`` wrapping
    does not enable the extension on torch 2.13.

    Example::

        >>> assert enable_2d_with_fsdp()
        >>> model = FSDP(parallelize_module(model, mesh2d, PairwiseParallel(), tp_mesh_dim=1),
        ...              device_mesh=mesh2d["dp"], use_orig_params=True)
    """
    try:
        check_fsdp_extension_machinery()
    except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
        warnings.warn(f"{_WARNING}: {type(exc).__name__}: {exc}", stacklevel=2)
        return False
    return True


def parallelize_2d(
    model: nn.Module,
    mesh2d: DeviceMesh,
    plan: Plan,
    *,
    dp_dim: str = "dp",
    tp_dim: str = "tp",
) -> nn.Module:
    """Apply ``plan`` on ``mesh2d[tp_dim]``, then FSDP2 ``fully_shard`` on ``mesh2d[dp_dim]``.

    Only the root module is wrapped with ``fully_shard``; wrap blocks yourself first
    (``fully_shard(block, mesh=mesh2d["dp"])``) if you want per-block all-gathers. Feed
    each dp rank its own batch; gradients are averaged over ``dp_dim``.

    Example::

        >>> mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        >>> model = parallelize_2d(MLP(), mesh2d, PairwiseParallel())
        >>> model.net1.weight.device_mesh.mesh_dim_names
        ('dp', 'tp')
    """
    names = mesh2d.mesh_dim_names
    if mesh2d.ndim != 2 or names is None or dp_dim not in names or tp_dim not in names:
        raise ValueError(
            f"parallelize_2d needs a 2-D mesh with dimension names {dp_dim!r} and {tp_dim!r}; "
            f"got a {mesh2d.ndim}-D mesh named {names}"
        )
    if dp_dim == tp_dim:
        raise ValueError(f"dp_dim and tp_dim must differ, both are {dp_dim!r}")
    from torch.distributed.fsdp import fully_shard

    model = parallelize_module(model, mesh2d, plan, tp_mesh_dim=names.index(tp_dim))
    fully_shard(model, mesh=mesh2d[dp_dim])
    return model
