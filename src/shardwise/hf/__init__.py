"""Tensor parallelism for Hugging Face ``transformers`` models.

:func:`auto_plan` builds a printable plan (FQN glob -> style) for Llama, Mistral, Qwen2,
GPT-2 and BERT, from the model's own ``tp_plan`` where transformers ships one and from
its module structure otherwise; :func:`parallelize_hf` applies it. The model keeps its
interface: full logits as plain tensors, HF's loss and ``generate()`` unchanged.

:func:`from_pretrained` loads a checkpoint directory straight into each rank's shards
(built and parallelized on meta, each rank reading only its slices), and
:func:`save_pretrained` writes one back that transformers loads on one device.

Only those two import ``transformers`` (when called); the plans read the model given.

Example::

    >>> from shardwise.hf import auto_plan, parallelize_hf
    >>> print(auto_plan(model))
    >>> model = parallelize_hf(model, init_device_mesh("cpu", (2,)))
"""

from ..styles.heads import AttentionHeads, ColwiseHeads, HeadLayout, RowwiseHeads, head_layout
from .conv1d import ColwiseConv1D, RowwiseConv1D, is_conv1d
from .loading import from_pretrained
from .plans import SUPPORTED_MODEL_TYPES, auto_plan, parallelize_hf, translate_tp_plan
from .saving import save_pretrained

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionHeads",
    "ColwiseConv1D",
    "ColwiseHeads",
    "HeadLayout",
    "RowwiseConv1D",
    "RowwiseHeads",
    "auto_plan",
    "from_pretrained",
    "head_layout",
    "is_conv1d",
    "parallelize_hf",
    "save_pretrained",
    "translate_tp_plan",
]
