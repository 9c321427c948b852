"""Choosing the 1-D tensor-parallel mesh from what the caller passed.

Example::

    >>> mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    >>> tp = tp_submesh(mesh2d, tp_mesh_dim=1)   # this rank's row: ranks {0,1} or {2,3}
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["check_rank_in_mesh", "default_mesh", "tp_submesh"]


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over the default process group (the seed's no-mesh example).

    Example::

        >>> parallelize_module(model, PairwiseParallel())   # uses default_mesh()
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "parallelize_module was called without a device_mesh and torch.distributed is not "
            "initialized; call dist.init_process_group() (torchrun) or pass a DeviceMesh."
        )
    backend = dist.get_backend()
    device_type = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
    world = dist.group.WORLD
    assert world is not None
    return DeviceMesh.from_group(world, device_type)


def check_rank_in_mesh(mesh: DeviceMesh) -> None:
    """Raise if the calling rank is not one of ``mesh``'s ranks.

    Example::

        >>> check_rank_in_mesh(mesh)   # silent on ranks that belong to it
    """
    if mesh.get_coordinate() is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise ValueError(
            f"rank {rank} is not part of the device mesh {mesh.mesh.tolist()}; "
            "every rank that calls parallelize_module must belong to its mesh."
        )


def tp_submesh(device_mesh: DeviceMesh, tp_mesh_dim: int = 0) -> DeviceMesh:
    """The 1-D mesh along ``tp_mesh_dim`` that contains the calling rank.

    The mesh's existing process group for that dimension is reused; nothing is created.

    Example::

        >>> tp_submesh(mesh2d, 1).mesh   # on rank 2 of [[0, 1], [2, 3]]
        tensor([2, 3])
    """
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a DeviceMesh, got {type(device_mesh).__name__}")
    ndim = device_mesh.ndim
    if isinstance(tp_mesh_dim, bool) or not isinstance(tp_mesh_dim, int):
        # bool is an int subclass: ``tp_mesh_dim=True`` would otherwise silently mean 1.
        raise ValueError(
            f"tp_mesh_dim must be an int mesh dimension, got {tp_mesh_dim!r} "
            f"({type(tp_mesh_dim).__name__})."
        )
    if not -ndim <= tp_mesh_dim < ndim:
        raise ValueError(
            f"Expect tp_mesh_dim within range [{-ndim}, {ndim}), but found {tp_mesh_dim}."
        )
    check_rank_in_mesh(device_mesh)
    if ndim == 1:
        return device_mesh
    dim = tp_mesh_dim % ndim
    names = device_mesh.mesh_dim_names
    if names is not None:
        return device_mesh[names[dim]]
    coordinate = device_mesh.get_coordinate()
    assert coordinate is not None
    index: list[int | slice] = list(coordinate)
    index[dim] = slice(None)
    ranks = device_mesh.mesh[tuple(index)]
    return DeviceMesh.from_group(device_mesh.get_group(dim), device_mesh.device_type, mesh=ranks)
