"""shardwise: tensor parallelism for PyTorch, on PyTorch's own DeviceMesh and DTensor.

Example::

    >>> import shardwise
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> mesh = init_device_mesh("cpu", (2,))
    >>> model = shardwise.parallelize_module(model, mesh, shardwise.PairwiseParallel())
"""

from . import hf as hf  # registers Hugging Face models with auto_plan
from .api import parallelize_module
from .clip_grad import clip_grad_norm_
from .diagnostics.explain import explain
from .diagnostics.explain_report import ExplainReport
from .diagnostics.verify import Divergence, VerifyResult, verify
from .fsdp import enable_2d_with_fsdp
from .layouts import (
    make_input_replicate_1d,
    make_input_reshard_replicate,
    make_input_shard_1d,
    make_input_shard_1d_last_dim,
    make_output_replicate_1d,
    make_output_reshard_tensor,
    make_output_shard_1d,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .loss import vocab_parallel_cross_entropy
from .multihead_attention_tp import TensorParallelMultiheadAttention
from .optim import foreach_param_groups, step_on_local_shards
from .planning.auto import auto_plan, register_auto_plan
from .planning.expand import expand_plan
from .styles.base import ModuleStyle, ParallelStyle
from .styles.composite import PairwiseParallel, SequenceParallel
from .styles.linear import ColwiseParallel, RowwiseParallel
from .styles.prepare import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput

__version__ = "0.1.0"

__all__ = [
    "ColwiseParallel",
    "Divergence",
    "ExplainReport",
    "ModuleStyle",
    "PairwiseParallel",
    "ParallelStyle",
    "PrepareModuleInput",
    "PrepareModuleInputOutput",
    "PrepareModuleOutput",
    "RowwiseParallel",
    "SequenceParallel",
    "TensorParallelMultiheadAttention",
    "VerifyResult",
    "auto_plan",
    "clip_grad_norm_",
    "enable_2d_with_fsdp",
    "expand_plan",
    "explain",
    "foreach_param_groups",
    "make_input_replicate_1d",
    "make_input_reshard_replicate",
    "make_input_shard_1d",
    "make_input_shard_1d_last_dim",
    "make_output_replicate_1d",
    "make_output_reshard_tensor",
    "make_output_shard_1d",
    "make_output_tensor",
    "make_sharded_output_tensor",
    "parallelize_module",
    "step_on_local_shards",
    "verify",
    "register_auto_plan",
    "vocab_parallel_cross_entropy",
]
