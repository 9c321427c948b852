"""The seed's ``make_input_*`` / ``make_output_*`` functions, on torch's DTensor.

Input functions turn what a module receives (a plain tensor holding this rank's piece,
or a DTensor) into a DTensor with the placement the module needs. Output functions turn
a module's DTensor result into what its caller gets back. All of them are
differentiable, and all accept ``device_mesh`` positionally or by keyword.

A plain tensor is trusted, not checked: ``make_input_shard_1d(x)`` says "x is this
rank's shard" and no collective verifies it. On the parallelized hot path shardwise
recognises these functions and runs the equivalent local collective instead of
building DTensors (see :mod:`shardwise._engine.sharded_linear`).

:class:`~shardwise._engine.io.ModuleIO` is the one form both spellings of a style's input and output handling
reduce to: the seed's functions (``_prepare_input=make_input_reshard_replicate``) and
torch 2.x's layouts (``input_layouts=Shard(0)``) become the same placements.

Example::

    >>> x_rep = make_input_replicate_1d(torch.ones(4, 8), mesh)   # DTensor [Replicate()]
    >>> y = make_output_tensor(x_rep)                             # plain tensor, same on all ranks
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from ._engine.io import ModuleIO, PrepareFn

__all__ = [
    "io_from_functions",
    "make_input_replicate_1d",
    "make_input_reshard_replicate",
    "make_input_shard_1d",
    "make_input_shard_1d_last_dim",
    "make_output_replicate_1d",
    "make_output_reshard_tensor",
    "make_output_shard_1d",
    "make_output_tensor",
    "make_sharded_output_tensor",
]

InputLike = torch.Tensor | DTensor | list[Any] | tuple[Any, ...]


def _input_mesh_and_tensor(
    input: InputLike, device_mesh: DeviceMesh | None
) -> tuple[torch.Tensor, DeviceMesh]:
    if isinstance(input, (list, tuple)):
        input = input[0]
    if not isinstance(input, torch.Tensor):
        raise RuntimeError(
            "Tensor parallel module expects torch.Tensor or DTensor input but received "
            f"{type(input)}!"
        )
    if device_mesh is None:
        if not isinstance(input, DTensor):
            raise RuntimeError("device_mesh is not passed nor can be inferred")
        device_mesh = input.device_mesh
    if device_mesh.ndim != 1:
        raise RuntimeError(
            f"device_mesh has dims {device_mesh.ndim} but expected to be 1 for input."
        )
    return input, device_mesh


def _output_mesh(output: Any, device_mesh: DeviceMesh | None) -> DeviceMesh:
    if not isinstance(output, DTensor):
        raise AssertionError(
            f"Expect output of Tensor Parallel to be a DTensor, but found {type(output)}."
        )
    mesh = output.device_mesh if device_mesh is None else device_mesh
    if mesh.ndim != 1:
        raise AssertionError(f"device_mesh has dims {mesh.ndim} but expected to be 1 for output.")
    return mesh


def _to_placement(
    input: torch.Tensor, mesh: DeviceMesh, placement: Placement, plain_placement: Placement
) -> DTensor:
    if isinstance(input, DTensor):
        return input.redistribute(mesh, [placement])
    return DTensor.from_local(input, mesh, [plain_placement], run_check=False).redistribute(
        mesh, [placement]
    )


def make_input_replicate_1d(input: InputLike, device_mesh: DeviceMesh | None = None) -> DTensor:
    """Replicate ``input`` over a 1-D mesh; a plain tensor is this rank's full replica.

    Example::

        >>> make_input_replicate_1d(torch.ones(2, 4), mesh).placements
        (Replicate(),)
    """
    tensor, mesh = _input_mesh_and_tensor(input, device_mesh)
    return _to_placement(tensor, mesh, Replicate(), Replicate())


def make_input_reshard_replicate(input: InputLike, device_mesh: DeviceMesh | None = None) -> DTensor:
    """Treat a plain ``input`` as this rank's dim-0 shard, then replicate (all-gather).

    Example::

        >>> make_input_reshard_replicate(torch.ones(2, 4), mesh).shape   # 2 ranks
        torch.Size([4, 4])
    """
    tensor, mesh = _input_mesh_and_tensor(input, device_mesh)
    return _to_placement(tensor, mesh, Replicate(), Shard(0))


def make_input_shard_1d(
    input: InputLike, device_mesh: DeviceMesh | None = None, dim: int = 0
) -> DTensor:
    """Shard ``input`` on ``dim``; a plain tensor is this rank's shard of that dimension.

    Example::

        >>> make_input_shard_1d(torch.ones(2, 4), mesh, dim=0).shape   # 2 ranks
        torch.Size([4, 4])
    """
    tensor, mesh = _input_mesh_and_tensor(input, device_mesh)
    shard = Shard(dim % tensor.dim())
    return _to_placement(tensor, mesh, shard, shard)


def make_input_shard_1d_last_dim(
    input: InputLike, device_mesh: DeviceMesh | None = None
) -> DTensor:
    """:func:`make_input_shard_1d` on the last dimension.

    Example::

        >>> make_input_shard_1d_last_dim(torch.ones(2, 4), mesh).shape   # 2 ranks
        torch.Size([2, 8])
    """
    tensor, mesh = _input_mesh_and_tensor(input, device_mesh)
    return make_input_shard_1d(tensor, mesh, dim=tensor.dim() - 1)


def make_output_replicate_1d(output: DTensor, device_mesh: DeviceMesh | None = None) -> DTensor:
    """Redistribute a module's DTensor output to ``Replicate`` (all-gather or all-reduce).

    Example::

        >>> make_output_replicate_1d(partial_out).placements
        (Replicate(),)
    """
    mesh = _output_mesh(output, device_mesh)
    return output.redistribute(mesh, [Replicate()])


def make_output_shard_1d(
    output: DTensor, device_mesh: DeviceMesh | None = None, dim: int = 0
) -> DTensor:
    """Redistribute a module's DTensor output to ``Shard(dim)`` (reduce-scatter if Partial).

    Example::

        >>> make_output_shard_1d(partial_out, dim=0).placements
        (Shard(dim=0),)
    """
    mesh = _output_mesh(output, device_mesh)
    return output.redistribute(mesh, [Shard(dim % output.dim())])


def make_output_tensor(output: DTensor, device_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Replicate a module's DTensor output and return it as a plain tensor (the full value).

    Example::

        >>> make_output_tensor(partial_out).shape == partial_out.shape
        True
    """
    return make_output_replicate_1d(output, device_mesh).to_local()


def make_output_reshard_tensor(
    output: DTensor, device_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Shard a module's DTensor output on dim 0 and return this rank's chunk as a plain tensor.

    Example::

        >>> make_output_reshard_tensor(partial_out).shape[0] == partial_out.shape[0] // 2
        True
    """
    return make_output_shard_1d(output, device_mesh, dim=0).to_local()


def make_sharded_output_tensor(
    output: DTensor, _device_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Return the local piece of a module's DTensor output, without communication.

    Example::

        >>> make_sharded_output_tensor(colwise_out).shape[-1] == colwise_out.shape[-1] // 2
        True
    """
    _output_mesh(output, _device_mesh)
    return output.to_local()


_SEED_INPUTS: dict[Any, Placement] = {
    make_input_replicate_1d: Replicate(),
    make_input_reshard_replicate: Shard(0),
    make_input_shard_1d: Shard(0),
    make_input_shard_1d_last_dim: Shard(-1),
}
_SEED_OUTPUTS: dict[Any, tuple[Placement | None, bool]] = {
    make_output_tensor: (Replicate(), True),
    make_output_replicate_1d: (Replicate(), False),
    make_output_reshard_tensor: (Shard(0), True),
    make_output_shard_1d: (Shard(0), False),
    make_sharded_output_tensor: (None, True),  # None: the module's own layout
    None: (None, False),
}


def io_from_functions(
    natural: Placement, prepare_input: PrepareFn | None, prepare_output: PrepareFn | None
) -> ModuleIO:
    """The :class:`ModuleIO` of the seed's ``(_prepare_input, _prepare_output)`` pair.

    ``natural`` is the layout the module computes (``Shard(-1)`` column-wise, ``Partial()``
    row-wise), kept by :func:`make_sharded_output_tensor`. The seed's own functions are
    recognised by identity and become placements (and so local collectives); any other
    function is kept and runs on DTensors.

    Example::

        >>> io_from_functions(Shard(-1), make_input_reshard_replicate, make_output_tensor)
        ModuleIO(input_layout=Shard(dim=0), output_layout=Replicate(), use_local_output=True, ...)
    """
    in_layout, in_fn = _SEED_INPUTS.get(prepare_input), None
    if prepare_input is not None and in_layout is None:
        in_fn = prepare_input
    if prepare_output in _SEED_OUTPUTS:
        layout, local = _SEED_OUTPUTS[prepare_output]
        return ModuleIO(in_layout, layout or natural, local, in_fn)
    return ModuleIO(in_layout, natural, False, in_fn, prepare_output)
