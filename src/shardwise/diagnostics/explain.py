"""``shardwise.explain``: what a plan costs per rank, before launch, from one process.

:func:`explain` dry-runs one training step of a plan: it copies the model onto the meta
device (no weights are read or allocated), applies the plan with
:func:`~shardwise.parallelize_module` on a fake TP group of any size, and runs forward
and backward as rank 0. What it reports is what that run did, not a formula:

* parameters: the elements of every local shard, as a real rank holds them; rank 0
  holds the most (``torch.chunk`` gives the first ranks the larger pieces);
* collectives: every all-reduce, all-gather and reduce-scatter the forward and the
  backward issue on the TP group, counted and sized from the c10d ops themselves
  (:class:`~shardwise.diagnostics.dryrun.CollectiveLog`), so the shared entry collective of q/k/v
  and the sequence-parallel norm gradient all-reduces are in it exactly as they run;
* activations: bytes of the distinct storages autograd saves in the forward, leaving
  out parameters; attention is counted as the fused CPU kernel saves it;
* gradients: one per trainable element; optimizer states: two per element for
  AdamW/Adam, in the parameter's dtype, none for SGD.

The loss of the dry run is the model's own when its output has a scalar ``loss`` (pass
labels), and otherwise the sum of its floating outputs, which saves nothing itself.

Example::

    >>> report = shardwise.explain(model, plan, tp_size=8, seq_len=4096, dtype=torch.bfloat16)
    >>> print(report)
    >>> report.to_dict()["memory_per_rank"]["total"]
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .._engine.collectives import chunk_range
from .._engine.torch_compat import FakeTensorMode, pytree
from ..api import parallelize_module
from ..planning.expand import expand_plan, resolve
from ..styles.base import ParallelStyle, join_fqn
from .dryrun import CollectiveLog, fake_mesh, saved_activation_bytes
from .explain_report import ExplainReport, pattern

__all__ = ["OPTIMIZER_STATES", "ExplainReport", "explain", "meta_copy", "module_rows", "planned_styles"]

#: States an optimizer keeps per trainable element, in the parameter's dtype.
OPTIMIZER_STATES: dict[str | None, int] = {"adamw": 2, "adam": 2, "sgd": 0, None: 0}

#: A replicated parameter (or group of them by name pattern) this large is warned about.
LARGE_SHARE = 0.01


def explain(
    model: nn.Module,
    plan: Any,
    *,
    tp_size: int,
    example_inputs: Any = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    optimizer: str | None = "adamw",
    backend: str = "nccl",
) -> ExplainReport:
    """Dry-run one training step of ``plan`` at ``tp_size`` and report its cost per rank.

    Runs in this process, on fake tensors (shapes and dtypes, no storage) over a fake
    process group: nothing is allocated or communicated, with or without a process group
    already set up, and ``model`` (on meta or real) is not modified. A plan
    ``parallelize_module`` would refuse raises the same error here, before any group is
    made.

    Args:
        model: the single-device model.
        plan: what you would pass to ``parallelize_module`` (``"auto"`` for a Hugging
            Face model: :func:`shardwise.hf.auto_plan` at ``tp_size``).

    Keyword Args:
        tp_size: the tensor-parallel size, a positive int.
        example_inputs: what one rank feeds the parallelized model: a tensor, a tuple of
            positional arguments, or a dict of keyword arguments (the full batch for
            replicated-input plans, its sequence shard for sequence-parallel ones).
            Values are only read for their shapes, dtypes and ``requires_grad``.
            Default, for a Hugging Face model: ``input_ids`` of ``(batch_size, seq_len)``.
        batch_size, seq_len: the default inputs' shape; ``seq_len`` defaults to the
            config's ``max_position_embeddings``.
        dtype: cast floating parameters, buffers and inputs to it first (as ``.to(dtype)``).
        optimizer: ``"adamw"``/``"adam"`` (2 states per element), ``"sgd"`` or ``None`` (0).
        backend: whose wire format the collectives are sized in. ``"nccl"`` (default):
            payloads only, every step alike. ``"gloo"``: CPU runs, whose sequence-parallel
            gathers carry each rank's shape in a header and agree on a padded capacity the
            first time a size is seen, so the report also gives the first step.

    Example::

        >>> report = explain(GPTStack(32, 4), {"blocks.*": gpt_block_plan()}, tp_size=2,
        ...                  example_inputs=torch.randn(16, 2, 32))
        >>> report.to_dict()["collectives"]["forward"]["all_reduce"]
        {'count': 4, 'bytes': 16384}
    """
    key = _check_arguments(model, tp_size, batch_size, seq_len, optimizer, backend)
    meta = meta_copy(model, dtype)
    if isinstance(plan, str) and plan == "auto":
        from ..planning.auto import auto_plan

        plan = auto_plan(meta, tp_size=tp_size)
    expand_plan(meta, plan, tp_size)  # every check, before any group is made
    styles = planned_styles(meta, plan)
    total = sum(p.numel() for p in meta.parameters())
    with fake_mesh(tp_size, backend=backend) as mesh, torch.enable_grad():
        model_tp = parallelize_module(meta, mesh, plan)
        model_tp.train()
        with FakeTensorMode(allow_non_fake_inputs=True):
            model_tp.to_empty(device="cpu")
            args, kwargs = _inputs(model_tp, example_inputs, batch_size, seq_len, dtype)
            steps = [
                _dry_step(model_tp, args, kwargs, mesh.get_group())
                for _ in range(2 if backend == "gloo" else 1)  # gloo: the first step differs
            ]
            params = list(model_tp.parameters())  # each tied parameter once
            local = {id(p): _local(p) for p in params}
    param_bytes = sum(t.numel() * t.element_size() for t in local.values())
    grad_bytes = sum(
        t.numel() * t.element_size() for p in params if p.requires_grad for t in [local[id(p)]]
    )
    steady = steps[-1]
    memory = {
        "parameters": param_bytes,
        "gradients": grad_bytes,
        "optimizer_states": OPTIMIZER_STATES[key] * grad_bytes,
        "activations": steady.activations,
    }
    memory["total"] = sum(memory.values())
    warnings = _warnings(model_tp, styles, tp_size, total)
    others = sorted({kind for step in steps for kind in step.others})
    if others:
        warnings.append(f"the step also runs {', '.join(others)}, not counted in the table.")
    return ExplainReport(
        tp_size=tp_size,
        params_total=total,
        params_per_rank=sum(t.numel() for t in local.values()),
        memory_per_rank=memory,
        collectives=steady.collectives,
        modules=module_rows(model_tp, styles),
        warnings=warnings,
        inputs=_describe(args, kwargs),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        optimizer=key,
        backend=backend,
        first_step_collectives=None if steps[0] == steady else steps[0].collectives,
    )


# The largest mesh a dry run builds: its fake group keeps one entry per rank.
MAX_RANKS = 1 << 16


def _check_arguments(
    model: Any, tp_size: Any, batch_size: Any, seq_len: Any, optimizer: Any, backend: Any
) -> str | None:
    """Raise on arguments no run could take; returns the optimizer's key."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain expects an nn.Module, got {type(model).__name__}")
    for name, value in (("tp_size", tp_size), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value is None and name == "seq_len":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tp_size > MAX_RANKS:
        raise ValueError(f"tp_size {tp_size} is more ranks than a dry run models (at most {MAX_RANKS})")
    key = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if key not in OPTIMIZER_STATES:
        known = ", ".join(repr(k) for k in OPTIMIZER_STATES)
        raise ValueError(f"optimizer must be one of {known}, got {optimizer!r}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    return key


@dataclass(frozen=True)
class _StepCost:
    """What one dry-run training step communicated and saved."""

    collectives: dict[str, dict[str, dict[str, int]]]
    activations: int
    others: tuple[str, ...]


def _dry_step(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], group: Any) -> _StepCost:
    """One forward and backward of ``model`` on fake tensors, logged on ``group``."""
    fixed = [_local(p) for p in model.parameters()] + list(model.buffers())
    with CollectiveLog(group) as fwd, saved_activation_bytes(fixed) as saved:
        out = model(*args, **kwargs)
    with CollectiveLog(group) as bwd:
        _loss(out).backward()
    model.zero_grad(set_to_none=True)
    return _StepCost(
        {"forward": fwd.summary(), "backward": bwd.summary()},
        saved["bytes"],
        tuple(fwd.others() + bwd.others()),
    )


def meta_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on the meta device.

    No weight is copied (ties are kept: each tensor is replaced once), so this is cheap
    for a real 70B model too. ``dtype`` casts floating tensors, as ``.to(dtype)`` would.

    Example::

        >>> meta_copy(model).q.weight.device
        device(type='meta')
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        m = torch.empty_like(t, device="meta", dtype=cast)
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(
            t, nn.Parameter
        ) else m
    return copy.deepcopy(model, memo)


def planned_styles(model: nn.Module, plan: Any) -> dict[str, ParallelStyle]:
    """Every FQN a plan names (globs resolved), with its style; ``{}`` for a bad plan.

    Example::

        >>> planned_styles(stack, {"blocks.*.q": ColwiseParallel()})
        {'blocks.0.q': ColwiseParallel(...), 'blocks.1.q': ColwiseParallel(...)}
    """
    out: dict[str, ParallelStyle] = {}

    def walk(root: nn.Module, prefix: str, entries: Mapping[Any, Any]) -> None:
        for key, value in entries.items():
            if not isinstance(key, str):
                continue
            try:
                matches = resolve(root, key)
            except AttributeError:
                continue  # parallelize_module raises on it
            for fqn, module in matches:
                full = join_fqn(prefix, fqn)
                if isinstance(value, Mapping):
                    walk(module, full, value)
                elif isinstance(value, ParallelStyle):
                    out[full] = value

    if isinstance(plan, ParallelStyle):
        out[""] = plan
    elif isinstance(plan, Mapping):
        walk(model, "", plan)
    return out


def _style_of(fqn: str, styles: Mapping[str, ParallelStyle]) -> ParallelStyle | None:
    """The style planned for ``fqn``, or for its nearest planned ancestor."""
    while True:
        if fqn in styles:
            return styles[fqn]
        if not fqn:
            return None
        fqn = fqn.rpartition(".")[0]


def module_rows(model: nn.Module, styles: Mapping[str, ParallelStyle]) -> list[dict[str, Any]]:
    """One row per planned module: FQN, style, and each direct parameter's layout."""
    rows = []
    for fqn, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if fqn not in styles and not any(isinstance(p, DTensor) for _, p in own):
            continue
        style = _style_of(fqn, styles)
        params = {}
        for name, p in own:
            placements = [repr(x) for x in p.placements] if isinstance(p, DTensor) else ["Replicate()"]
            params[name] = {
                "placements": placements,
                "global_shape": list(p.shape),
                "local_shape": list(_local(p).shape),
            }
        rows.append({
            "fqn": fqn,
            "style": "" if style is None else type(style).__name__,
            "params": params,
        })
    return rows


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _to_fake(x: Any, dtype: torch.dtype | None) -> Any:
    """``x`` as a fake CPU tensor of its shape and dtype (inside the dry run's fake mode)."""
    if isinstance(x, DTensor):
        raise TypeError("example_inputs must be plain tensors (what one rank feeds), not DTensors")
    if not isinstance(x, torch.Tensor):
        return x
    cast = dtype if dtype is not None and x.is_floating_point() else x.dtype
    m = torch.empty(x.shape, device="cpu", dtype=cast)
    return m.requires_grad_(x.requires_grad and m.is_floating_point())


def _inputs(
    model: nn.Module, example: Any, batch: int, seq: int | None, dtype: torch.dtype | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "vocab_size"):
            raise ValueError(
                f"explain needs example_inputs for {type(model).__name__} (the default, "
                "input_ids of (batch_size, seq_len), is for Hugging Face language models)."
            )
        if seq is None:
            seq = getattr(config, "max_position_embeddings", None)
            if seq is None:
                raise ValueError("pass seq_len: the model's config has no max_position_embeddings")
        example = {"input_ids": torch.zeros(batch, seq, dtype=torch.long)}
    leaves = pytree.tree_leaves(example)
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError(
            "example_inputs must hold at least one tensor (a tensor, a tuple of positional "
            f"arguments or a dict of keyword arguments), got {type(example).__name__}"
        )
    example = pytree.tree_map(lambda x: _to_fake(x, dtype), example)
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _describe(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    named = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in named.items()
        if isinstance(t, torch.Tensor)
    }


def _loss(out: Any) -> torch.Tensor:
    """The dry run's loss: the model's own scalar ``loss``, else the sum of its outputs."""
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad:
        return loss
    leaves = pytree.tree_leaves(dict(out) if isinstance(out, Mapping) else out)
    terms = [
        (_local(t) if isinstance(t, DTensor) else t).sum()
        for t in leaves
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not terms:
        raise ValueError("the model's output has no floating tensor that requires grad")
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def _warnings(
    model: nn.Module, styles: Mapping[str, ParallelStyle], tp: int, total: int
) -> list[str]:
    from ..styles.heads import AttentionHeads, head_layout

    out: list[str] = []
    if tp == 1:
        return out
    owners = {id(p): (fqn, m) for fqn, m in model.named_modules() for p in m.parameters(False)}
    replicated: dict[str, list[tuple[str, int, nn.Module]]] = {}
    uneven: dict[str, tuple[int, int]] = {}
    for name, p in model.named_parameters():
        placements = p.placements if isinstance(p, DTensor) else ()
        shards = [x for x in placements if isinstance(x, Shard)]
        if not shards:
            replicated.setdefault(pattern(name), []).append((name, p.numel(), owners[id(p)][1]))
        for s in shards:
            size = p.shape[s.dim]
            if size % tp:
                uneven.setdefault(pattern(name), (s.dim, size))
    for pat, found in replicated.items():
        elements = sum(n for _, n, _ in found)
        if elements < LARGE_SHARE * total:
            continue
        module = found[0][2]
        many = f" ({len(found)} parameters)" if len(found) > 1 else ""
        what = f"{pat}{many}: {elements:,} elements, {elements / total:.1%} of the model,"
        if isinstance(module, nn.Linear) and _style_of(found[0][0].rpartition(".")[0], styles) is None:
            out.append(
                f"{what} belongs to a Linear that is not in the plan ({module.in_features} -> "
                f"{module.out_features}): it is replicated on every rank."
            )
        else:
            out.append(f"{what} is replicated on every rank.")
    for pat, (dim, size) in uneven.items():
        pieces = [chunk_range(size, tp, r)[1] for r in range(tp)]
        out.append(
            f"uneven shards: {pat} splits dim {dim} ({size}) over {tp} ranks as "
            f"{_pieces(pieces)}; rank 0 holds the most."
        )
    seen: set[str] = set()
    for fqn, style in styles.items():
        if not isinstance(style, AttentionHeads):
            continue
        pat = pattern(fqn)
        layout = head_layout(style.heads, style.kv_heads, tp)
        if pat in seen or layout.kv_even:
            continue
        seen.add(pat)
        if style.kv_heads < tp:
            out.append(
                f"KV heads replicated in {pat}: {style.kv_heads} key/value heads over {tp} "
                f"ranks, each held by {tp // style.kv_heads} ranks; the key/value projection "
                "weights stay whole on every rank (compute is split, their memory is not)."
            )
        else:
            out.append(
                f"uneven heads in {pat}: {style.heads} query / {style.kv_heads} key/value "
                f"heads over {tp} ranks; the projections stay whole on every rank."
            )
    return out


def _pieces(sizes: list[int]) -> str:
    if len(sizes) <= 4:
        return ", ".join(map(str, sizes))
    return f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]}"
