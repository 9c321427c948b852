"""Every private torch API shardwise uses, in one place, each with why and since when.

Names that can be imported are imported here and nowhere else. A few private
*attributes* are read where they are used, on the hot path, where a wrapper call would
cost more than the read itself; they are listed in the table below so that a torch
upgrade has one page to check. ``tests/`` pins torch 2.13; ``pyproject.toml`` declares
``torch>=2.5``, and every entry here exists from 2.5 on unless it says otherwise.

Attributes read in place:

==================================  =====================================  ==================================
attribute                           where                                  why
==================================  =====================================  ==================================
``DTensor._local_tensor``           local_params, sharded_linear,          the local leaf a parameter's
                                    grad_handoff, optim.shards             forward (and the optimizer's
                                                                           step) runs on, without a view
``DTensor._spec``                   grad_handoff (:func:`dtensor_like`),   a gradient with its parameter's
                                    optim.shards                           layout, without redistribution
``Optimizer._init_group``           optim.local_step                       torch's own state creation, so
                                                                           the local step's state is torch's
``Tensor._base``, ``._version``     sharded_linear (entry cache),          which activation a view is, and
                                    styles.heads                           whether it changed in place
``Module._parameters``              sharded_linear, ties, local_params     the registered parameter itself,
                                                                           bypassing ``__getattr__``
``MultiheadAttention.``             multihead_attention_tp                 nn.MultiheadAttention's own flag
``_qkv_same_embed_dim``                                                    for one packed in-projection
==================================  =====================================  ==================================
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

__all__ = [
    "DropoutBase",
    "FakeTensorMode",
    "DTensorSpec",
    "StridedShard",
    "TorchDispatchMode",
    "all_gather_single",
    "check_fsdp_extension_machinery",
    "current_graph_task_id",
    "dcp_set_element",
    "dcp_storage_info_class",
    "dtensor_like",
    "fake_group_in_job",
    "fake_world",
    "foreach_mul_",
    "is_fake",
    "pytree",
    "queue_engine_callback",
]

# ``_StridedShard``: a dim split into ``split_factor`` interleaved parts before sharding.
# FSDP2 + TP use it themselves; shardwise uses it for GPT-2's fused q|k|v ``c_attn``
# (hf/conv1d.py) so the parameter keeps its name and its checkpoint layout. Since 2.5.
# ``DTensorSpec``: the type of ``DTensor._spec`` (mesh, placements, shape), which the local
# optimizer step compares instead of the DTensor's slower properties.
from torch.distributed.tensor._dtensor_spec import DTensorSpec  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard  # noqa: E402

# ``_DropoutNd``: the base of every dropout module (Dropout, Dropout1d/2d/3d,
# AlphaDropout, FeatureAlphaDropout); one isinstance instead of a list that misses one.
DropoutBase: type[nn.Module] = nn.modules.dropout._DropoutNd

# The autograd engine's ``queue_callback``: run a function once when the current
# backward pass ends (grad_handoff hands gradients over there, once per pass).
queue_engine_callback = torch.autograd.Variable._execution_engine.queue_callback

# ``torch._C._current_graph_task_id``: which backward pass is running, so reentrant
# checkpointing's inner passes hand over only their own leaves. ``None`` where missing
# (then every gradient is handed over as soon as it arrives).
current_graph_task_id: Any = getattr(torch._C, "_current_graph_task_id", None)

# ``torch._foreach_mul_``: one kernel launch to scale every gradient (clip_grad), as
# ``torch.nn.utils.clip_grad_norm_`` itself does.
foreach_mul_ = torch._foreach_mul_

# ``all_gather_single`` is the newer name of ``all_gather_into_tensor`` (one output tensor,
# each rank's input at its offset); whichever this torch has.
all_gather_single: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# ``torch.utils._pytree``: map over the tensors of nested inputs/outputs (explain's dry run
# moves example inputs to meta and finds the loss). No public module in torch 2.13.
# ``FakeTensor``: explain's dry run computes on fake CPU tensors (no storage), on which
# nothing may read values on the host (a sized gather's headers are emulated instead).
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402


def is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (a dry run's: shapes and dtypes, no values)."""
    return isinstance(t, FakeTensor)


# ``TorchDispatchMode``: see every aten and c10d op a dry run issues (explain's collective
# log), the mechanism CommDebugMode itself is built on.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def dtensor_like(local: torch.Tensor, like: DTensor) -> DTensor:
    """A DTensor holding ``local`` with ``like``'s layout (``DTensor.__new__`` with its spec).

    Skips the Python ``__init__``/``from_local`` wrappers, which do nothing here and cost
    twice as much as the tensor itself (a gradient handed over per parameter per step).
    """
    return DTensor.__new__(DTensor, local, like._spec, requires_grad=False)


def fake_world(size: int) -> None:
    """Initialize the default process group as torch's fake backend of ``size`` ranks.

    The ``"fake"`` backend (``torch.testing._internal.distributed.fake_pg``) only exists after
    that module is imported; its collectives move no data. Since 2.1.
    """
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers "fake")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)


def fake_group_in_job(size: int, name: str, others: list[int]) -> dist.ProcessGroup:
    """A fake group of ``size`` ranks registered beside a running job's groups.

    This process is its rank 0 and ``others`` (global rank numbers no real process has)
    are its ranks 1 to ``size - 1``; ``dist.destroy_process_group(pg)`` removes it. Built
    the way c10d builds a group (a ``ProcessGroup`` with ``FakeProcessGroup`` as its
    backend, then ``_register_pg_in_world``), so DeviceMesh and DTensor accept it. Since 2.4.
    """
    from torch._C._distributed_c10d import FakeProcessGroup
    from torch.distributed import distributed_c10d as c10d
    from torch.testing._internal.distributed.fake_pg import FakeStore

    store = FakeStore()
    pg = dist.ProcessGroup(store, 0, size)
    backend = FakeProcessGroup._create_internal(0, size)
    custom = dist.ProcessGroup.BackendType.CUSTOM
    pg._set_default_backend(custom)
    pg._register_backend(torch.device("cpu"), custom, backend)
    pg._set_group_name(name)  # type: ignore[arg-type]
    pg._set_group_desc("shardwise dry run (fake)")
    ranks = {dist.get_rank(): 0, **{r: i for i, r in enumerate(others, start=1)}}
    c10d._register_pg_in_world(pg, "fake", store, name, "cpu:fake", rank_mapping=ranks)  # type: ignore[arg-type]
    return pg


def dcp_storage_info_class() -> type:
    """DCP's ``_StorageInfo`` (a file's relative path, offset and length in ``.metadata``).

    Imported on call: ``torch.distributed.checkpoint`` loads FSDP and more. Since 2.2.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo


def dcp_set_element(root: Any, path: Any, value: Any) -> None:
    """DCP's ``_traverse.set_element``: put ``value`` at ``path`` in a nested state dict.

    What ``DefaultLoadPlanner.load_bytes`` does with a flattened state dict. Since 2.2.
    """
    from torch.distributed.checkpoint._traverse import set_element

    set_element(root, path, value)


def check_fsdp_extension_machinery() -> None:
    """Raise if a piece the FSDP x TP path relies on is missing from this torch.

    FSDP1 flattens TP's DTensor parameters through ``torch.distributed.fsdp.
    _fsdp_extensions`` and decides per instance, in ``_init_utils._init_extension``,
    whether its ``device_mesh`` is a slice of a larger root mesh
    (``DeviceMesh._get_root_mesh``); FSDP2 is ``fully_shard``. All private; all since 2.2.
    """
    ext = importlib.import_module("torch.distributed.fsdp._fsdp_extensions")
    for name in ("FSDPExtensions", "_ext_pre_flatten_transform", "_ext_post_unflatten_transform"):
        if not hasattr(ext, name):
            raise AttributeError(f"torch.distributed.fsdp._fsdp_extensions has no {name}")
    init_utils = importlib.import_module("torch.distributed.fsdp._init_utils")
    if not callable(getattr(init_utils, "_init_extension", None)):
        raise AttributeError("torch.distributed.fsdp._init_utils has no _init_extension")
    if not hasattr(DeviceMesh, "_get_root_mesh"):
        raise AttributeError("DeviceMesh has no _get_root_mesh (needed to detect a sliced mesh)")
    fsdp = importlib.import_module("torch.distributed.fsdp")
    if "device_mesh" not in inspect.signature(fsdp.FullyShardedDataParallel.__init__).parameters:
        raise TypeError("FullyShardedDataParallel does not accept device_mesh=")
    if not callable(getattr(fsdp, "fully_shard", None)):
        raise AttributeError("torch.distributed.fsdp has no fully_shard (FSDP2)")
