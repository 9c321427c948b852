"""Tensor-parallel plans for Hugging Face models, as plain dicts you can print and edit.

:func:`auto_plan` starts from the model's own plan where transformers ships one (the
config's ``base_model_tp_plan`` plus the class ``_tp_plan``, e.g. Llama, Qwen2, Mistral),
translating its style strings to shardwise styles, and from the module structure
otherwise (GPT-2, BERT). It then puts an :class:`~shardwise.styles.heads.AttentionHeads`
entry in front of each attention module's projections, so a head count that does not
split fails by name before any weight moves.

=========  ===================================================  ==============================
model      attention                                            MLP
=========  ===================================================  ==============================
Llama,     q/k/v ``ColwiseParallel``, o ``RowwiseParallel``      gate/up Colwise, down Rowwise
Qwen2,     (KV heads replicated / query heads split by group
Mistral    via ``ColwiseHeads``/``RowwiseHeads`` when uneven)
GPT-2      ``c_attn`` ``ColwiseConv1D(parts=3)``,               ``c_fc`` ColwiseConv1D,
           ``c_proj`` ``RowwiseConv1D``                         ``c_proj`` RowwiseConv1D
BERT       query/key/value Colwise, attention.output.dense      intermediate.dense Colwise,
           Rowwise                                              output.dense Rowwise
=========  ===================================================  ==============================

The vocabulary is sharded too: the input embeddings are vocabulary-parallel
(``RowwiseParallel``, ``Shard(0)``) and the output head column-parallel with its logits
gathered (HF's ``colwise_gather_output``), so every model still returns full,
single-device logits; a tied head and its embeddings stay one ``Shard(0)`` parameter.
``auto_plan(..., vocab_parallel=False)`` keeps the input embeddings, and a tied head with
them, replicated (an untied head is still column-parallel).

Example::

    >>> plan = auto_plan(model, tp_size=2)
    >>> print(plan)
    >>> model = parallelize_hf(model, mesh)
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate

from ..api import parallelize_module
from ..layouts import make_input_replicate_1d, make_output_tensor
from ..mesh import tp_submesh
from ..planning.auto import register_auto_plan
from ..planning.ties import tied_groups
from ..styles.base import ParallelStyle
from ..styles.heads import AttentionHeads, ColwiseHeads, RowwiseHeads, head_layout
from ..styles.linear import ColwiseParallel, RowwiseParallel
from .conv1d import ColwiseConv1D, RowwiseConv1D

__all__ = ["SUPPORTED_MODEL_TYPES", "auto_plan", "parallelize_hf", "translate_tp_plan"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "bert")

_HF_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "local_colwise": ColwiseParallel,  # shardwise's hot path is always on local tensors
    "rowwise": RowwiseParallel,
    "local_rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(_prepare_output=make_output_tensor),
    "colwise_gather_output": lambda: ColwiseParallel(_prepare_output=make_output_tensor),
    "rowwise_rep": lambda: RowwiseParallel(_prepare_input=make_input_replicate_1d),
    "rowwise_split_input": lambda: RowwiseParallel(_prepare_input=make_input_replicate_1d),
}

# The Llama-family plan, for transformers releases whose configs do not carry one.
_DECODER_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}

_Q, _K, _V, _O = ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj",)


def translate_tp_plan(
    hf_plan: Mapping[str, str],
) -> tuple[dict[str, ParallelStyle], dict[str, str]]:
    """Translate a transformers ``tp_plan`` (FQN glob -> style string) to shardwise styles.

    Returns ``(plan, skipped)``: the entries shardwise runs, and those it leaves replicated
    (``embedding_rowwise``, ``sequence_parallel``, packed and MoE styles, ...).

    Example::

        >>> plan, skipped = translate_tp_plan({"layers.*.mlp.up_proj": "colwise",
        ...                                    "embed_tokens": "embedding_rowwise"})
        >>> plan
        {'layers.*.mlp.up_proj': ColwiseParallel(_prepare_input=make_input_replicate_1d, ...)}
        >>> skipped
        {'embed_tokens': 'embedding_rowwise'}
    """
    plan: dict[str, ParallelStyle] = {}
    skipped: dict[str, str] = {}
    for key, name in hf_plan.items():
        make = _HF_STYLES.get(name)
        if make is None:
            skipped[key] = name
        else:
            plan[key] = make()
    return plan, skipped


@dataclass(frozen=True)
class _Attention:
    """Where one kind of attention lives (full-model glob keys) and its head counts."""

    module: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(
            "auto_plan expects a Hugging Face PreTrainedModel (with .config), got "
            f"{type(model).__name__}."
        )
    return config


def _heads(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def _base_prefix(model: nn.Module) -> str:
    """Where the base model sits: ``"model."`` in ``LlamaForCausalLM``, ``""`` in ``LlamaModel``."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return f"{prefix}."
    return ""


def _matches(model: nn.Module, key: str) -> list[str]:
    """Names of the submodules ``key`` (dot-separated fnmatch atoms) selects."""
    atoms = key.split(".")
    return [
        name
        for name, _ in model.named_modules()
        if name
        and len(name.split(".")) == len(atoms)
        and all(fnmatch.fnmatchcase(part, atom) for part, atom in zip(name.split("."), atoms))
    ]


def _hf_plan(model: nn.Module, config: Any) -> dict[str, str]:
    """The model's full transformers TP plan (``model.tp_plan`` in v5, assembled otherwise)."""
    plan = getattr(model, "tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not base and config.model_type in ("llama", "mistral", "qwen2"):
        base = dict(_DECODER_PLAN)
    prefix = _base_prefix(model)
    full = dict(getattr(type(model), "_tp_plan", None) or {})
    full.update({f"{prefix}{k}": v for k, v in base.items()})
    return full


def _vocab_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, bool]:
    """The input embeddings, the output head, and whether the head shares their weight."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if callable(get_out) else None
    inp = get_in() if callable(get_in) else None
    weight = getattr(out, "weight", None)
    tied = weight is not None and weight is getattr(inp, "weight", None)
    return inp, out, tied


def _vocab_entries(
    model: nn.Module, tp_size: int | None, vocab_parallel: bool
) -> dict[str, ParallelStyle]:
    """Entries for the input embeddings and the output head.

    By default the input embeddings stay replicated, and so does a tied output head
    (sharding one side alone would untie it). An untied ``nn.Linear`` head is
    column-parallel with its logits gathered, so callers and HF's loss see full logits.

    With ``vocab_parallel`` the input embeddings are vocabulary-parallel too (each rank
    looks up its rows; one all-reduce), and a tied head shares their ``Shard(0)``
    parameter. A side whose weight is also held elsewhere (BERT's decoder bias) is left
    replicated, with anything tied to it.
    """
    inp, out, tied = _vocab_modules(model)
    if not vocab_parallel:
        inp = None
    names = {id(m): name for name, m in model.named_modules()}
    head_ok = isinstance(out, nn.Linear) and (tp_size is None or out.out_features >= tp_size)
    emb_ok = isinstance(inp, nn.Embedding) and (tp_size is None or inp.num_embeddings >= tp_size)
    allowed = {id(out), id(inp)}
    for group in tied_groups(model):
        if not all(id(h.module) in allowed for h in group):
            # Held by a module this plan does not shard: leave every holder replicated.
            holders = {id(h.module) for h in group}
            head_ok = head_ok and id(out) not in holders
            emb_ok = emb_ok and id(inp) not in holders
    if tied and not (head_ok and emb_ok):
        return {}  # sharding one side of the tie alone would untie it
    entries: dict[str, ParallelStyle] = {}
    if emb_ok:
        entries[names[id(inp)]] = RowwiseParallel(input_layouts=Replicate())
    if head_ok:
        entries[names[id(out)]] = ColwiseParallel(_prepare_output=make_output_tensor)
    return entries


def _attention_entries(att: _Attention, tp_size: int | None) -> dict[str, ParallelStyle]:
    """``AttentionHeads`` first, then q/k/v/o: sharded when the heads split evenly,
    head-sliced (replicated KV heads, query heads split by group) when ``tp_size`` needs it."""
    hd = att.head_dim
    layout = None
    if tp_size is not None:
        try:
            layout = head_layout(att.heads, att.kv_heads, tp_size, att.module)
        except ValueError:
            layout = None  # AttentionHeads.check raises it by module name
    q_even = layout is None or layout.q_even
    kv_even = layout is None or layout.kv_even
    uneven = not (q_even and kv_even)

    def col(part: Literal["q", "kv"]) -> ParallelStyle:
        if q_even if part == "q" else kv_even:
            return ColwiseParallel()
        return ColwiseHeads(att.heads, att.kv_heads, head_dim=hd, part=part)

    return {
        att.module: AttentionHeads(att.heads, att.kv_heads, head_dim=hd, uneven=uneven),
        att.q: col("q"),
        att.k: col("kv"),
        att.v: col("kv"),
        att.o: RowwiseParallel() if q_even else RowwiseHeads(att.heads, att.kv_heads, head_dim=hd),
    }


def _plan_from_hf(
    model: nn.Module, config: Any, hf_plan: Mapping[str, str], tp_size: int | None
) -> dict[str, ParallelStyle]:
    inp, out, _ = _vocab_modules(model)
    # The vocabulary entries are decided by _vocab_entries, whatever the HF plan says.
    out_names = {name for name, m in model.named_modules() if m is out or m is inp}
    translated, skipped = translate_tp_plan(hf_plan)
    if skipped:
        log.info("auto_plan: left replicated (HF styles shardwise does not run): %s", skipped)
    layers: dict[str, ParallelStyle] = {}
    for key, style in translated.items():
        targets = _matches(model, key)
        if not targets:
            log.info("auto_plan: %r matches no submodule (a parameter?); left replicated", key)
        elif not out_names.intersection(targets):
            layers[key] = style
    heads, kv_heads, head_dim = _heads(config)
    parents: dict[str, dict[str, str]] = {}
    for key in layers:
        parent, _, leaf = key.rpartition(".")
        for role, leaves in (("q", _Q), ("k", _K), ("v", _V), ("o", _O)):
            if leaf in leaves:
                parents.setdefault(parent, {})[role] = key
    plan: dict[str, ParallelStyle] = {}
    for parent, roles in parents.items():
        if set(roles) == {"q", "k", "v", "o"}:
            att = _Attention(
                parent, roles["q"], roles["k"], roles["v"], roles["o"], heads, kv_heads, head_dim
            )
            plan.update(_attention_entries(att, tp_size))
    plan.update({k: v for k, v in layers.items() if k not in plan})
    return plan


def _gpt2_plan(model: nn.Module, config: Any, tp_size: int | None) -> dict[str, ParallelStyle]:
    block = f"{_base_prefix(model)}h.*"
    heads, _, head_dim = _heads(config)
    plan: dict[str, ParallelStyle] = {
        f"{block}.attn": AttentionHeads(heads, heads, head_dim=head_dim),
        f"{block}.attn.c_attn": ColwiseConv1D(parts=3),  # fused q|k|v
        f"{block}.attn.c_proj": RowwiseConv1D(),
        f"{block}.mlp.c_fc": ColwiseConv1D(),
        f"{block}.mlp.c_proj": RowwiseConv1D(),
    }
    return plan


def _bert_plan(model: nn.Module, config: Any, tp_size: int | None) -> dict[str, ParallelStyle]:
    layer = f"{_base_prefix(model)}encoder.layer.*"
    heads, _, head_dim = _heads(config)
    att = _Attention(
        f"{layer}.attention.self",
        f"{layer}.attention.self.query",
        f"{layer}.attention.self.key",
        f"{layer}.attention.self.value",
        f"{layer}.attention.output.dense",
        heads,
        heads,
        head_dim,
    )
    plan = _attention_entries(att, tp_size)
    plan[f"{layer}.intermediate.dense"] = ColwiseParallel()
    plan[f"{layer}.output.dense"] = RowwiseParallel()
    return plan


_STRUCTURAL: dict[str, Callable[[nn.Module, Any, int | None], dict[str, ParallelStyle]]] = {
    "gpt2": _gpt2_plan,
    "bert": _bert_plan,
}


def auto_plan(
    model: nn.Module, *, tp_size: int | None = None, vocab_parallel: bool = True
) -> dict[str, ParallelStyle]:
    """A tensor-parallel plan for a Hugging Face model: FQN glob -> shardwise style.

    Supported: ``model_type`` in :data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2,
    GPT-2, BERT), as base models or with their heads (``*ForCausalLM``,
    ``GPT2LMHeadModel``, ``BertForMaskedLM``, ...). Cross-attention and position
    embeddings stay replicated.

    Args:
        model: a ``transformers`` ``PreTrainedModel``.

    Keyword Args:
        tp_size: the tensor-parallel size the plan is for. ``None`` gives the plain plan
            (whole heads per rank; an indivisible head count fails when it is applied).
            With a size, attention whose heads do not split evenly gets
            :class:`~shardwise.styles.heads.ColwiseHeads`/``RowwiseHeads`` (key/value heads
            replicated, query heads split by key/value group).
        vocab_parallel: shard the input embeddings over the vocabulary, and a tied
            output head with them (one parameter, ``Shard(0)``). On by default: it saves
            ``vocab x hidden x (N-1)/N`` per rank for one more all-reduce per forward.
            ``False`` leaves them replicated (an untied head stays column-parallel).

    Example::

        >>> model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, ...))
        >>> auto_plan(model)
        {'model.layers.*.self_attn': AttentionHeads(heads=4, kv_heads=2, head_dim=16),
         'model.layers.*.self_attn.q_proj': ColwiseParallel(...), ...}
    """
    config = _config(model)
    model_type = config.model_type
    if tp_size is not None and (not isinstance(tp_size, int) or tp_size < 1):
        raise ValueError(f"tp_size must be a positive int or None, got {tp_size!r}")
    if model_type in _STRUCTURAL:
        plan = _STRUCTURAL[model_type](model, config, tp_size)
    else:
        hf_plan = _hf_plan(model, config)
        if model_type not in SUPPORTED_MODEL_TYPES or not hf_plan:
            raise NotImplementedError(
                f"shardwise.hf.auto_plan supports model_type in {SUPPORTED_MODEL_TYPES}, got "
                f"{model_type!r} ({type(model).__name__}); write a plan dict for it "
                "(see shardwise.hf.translate_tp_plan for the model's own tp_plan, if it has one)."
            )
        plan = _plan_from_hf(model, config, hf_plan, tp_size)
    plan.update(_vocab_entries(model, tp_size, vocab_parallel))
    return plan


def parallelize_hf(
    model: nn.Module,
    mesh: DeviceMesh,
    plan: Mapping[str, Any] | None = None,
    *,
    tp_mesh_dim: int = 0,
) -> nn.Module:
    """Tensor-parallelize a Hugging Face model in place, keeping its interface.

    Logits come back as plain tensors with single-device shape and values, so
    ``model(input_ids, labels=...)`` computes HF's own loss and ``model.generate()``
    works unchanged (its KV cache holds this rank's heads).

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (see :func:`auto_plan`).
        mesh: the device mesh; an n-D mesh is sliced along ``tp_mesh_dim``.
        plan: a plan dict; ``None`` means ``auto_plan(model, tp_size=<TP size>)``.

    Keyword Args:
        tp_mesh_dim: the mesh dimension to shard over.

    Example::

        >>> mesh = init_device_mesh("cpu", (2,))
        >>> model = parallelize_hf(LlamaForCausalLM(config), mesh)
        >>> model.generate(input_ids, max_new_tokens=5, do_sample=False)
    """
    if plan is None:
        plan = auto_plan(model, tp_size=tp_submesh(mesh, tp_mesh_dim).size())
    return parallelize_module(model, mesh, plan, tp_mesh_dim=tp_mesh_dim)


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "model_type")


register_auto_plan("huggingface", _is_hf_model, auto_plan)
