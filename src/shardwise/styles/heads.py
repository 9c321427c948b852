"""Attention heads under tensor parallelism, for Hugging Face attention modules.

Column-sharding q/k/v by whole heads works with HF's modern attention code unchanged: it
reshapes with ``view(*input_shape, -1, head_dim)`` and merges with ``reshape(*input_shape,
-1)``. What still holds the *full* model are a few attributes: ``num_heads`` (older
releases), GPT-2's ``split_size`` (it splits the fused q|k|v output), BERT's
``all_head_size``, and ``num_key_value_groups`` once KV heads are replicated.
:class:`AttentionHeads` validates the head split without communicating and rewrites
those attributes to this rank's counts.

Which heads a rank holds (:func:`head_layout`, ``H`` query heads, ``KV`` key/value heads,
``W`` ranks):

===============  ===================================  =================================
case             query heads of rank r                key/value heads of rank r
===============  ===================================  =================================
``KV >= W``      those of its KV heads                a contiguous chunk of ``KV/W``
                                                      heads (rounded: uneven if needed)
``W % KV == 0``  its share of the ``H/KV`` heads of   one, ``r // (W/KV)``, replicated
                 group ``r // (W/KV)``                on the ``W/KV`` ranks sharing it
===============  ===================================  =================================

When that layout is an even contiguous split, plain ``ColwiseParallel`` /
``RowwiseParallel`` shard the projections. Otherwise :class:`ColwiseHeads` (q, k, v) and
:class:`RowwiseHeads` (o) keep the projection weights as ``Replicate`` DTensors and let
each rank compute with its own rows (or columns); each rank's weight gradient is then a
partial sum, all-reduced over the TP group before it reaches ``param.grad``. Compute is
split, parameter memory is not.

Example::

    >>> plan = {"layers.*.self_attn": AttentionHeads(4, 2, head_dim=16),
    ...         "layers.*.self_attn.q_proj": ColwiseParallel(), ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import Replicate, Shard

from .._engine import collectives as C
from .._engine.entry_cache import shared_entry
from .._engine.forward import ParallelForward, check_installable
from .._engine.local_params import distribute_parameter
from .base import ModuleStyle

__all__ = ["AttentionHeads", "ColwiseHeads", "HeadLayout", "RowwiseHeads", "head_layout"]

Span = tuple[int, int]


@dataclass(frozen=True)
class HeadLayout:
    """Per-rank ``[start, stop)`` ranges of query heads (``q``) and key/value heads (``kv``).

    Example::

        >>> head_layout(4, 2, 2).even, head_layout(4, 2, 4).even   # KV replicated at 4
        (True, False)
    """

    heads: int
    kv_heads: int
    world: int
    q: tuple[Span, ...]
    kv: tuple[Span, ...]

    @property
    def q_even(self) -> bool:
        """Query heads form ``W`` equal contiguous chunks (exactly ``Shard(0)`` of q_proj)."""
        return self.heads % self.world == 0 and all(
            b - a == self.heads // self.world for a, b in self.q
        )

    @property
    def kv_even(self) -> bool:
        """Key/value heads form ``W`` equal contiguous chunks, none replicated."""
        size = self.kv_heads // self.world
        return self.kv_heads % self.world == 0 and all(
            (a, b) == (r * size, (r + 1) * size) for r, (a, b) in enumerate(self.kv)
        )

    @property
    def even(self) -> bool:
        """Both splits are even: plain Colwise/Rowwise styles can shard the projections."""
        return self.q_even and self.kv_even


def _spans(sizes: list[int]) -> tuple[Span, ...]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return tuple(out)


def _split(n: int, parts: int) -> list[int]:
    """``n`` items in ``parts`` contiguous groups, the first ``n % parts`` one larger."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def head_layout(heads: int, kv_heads: int, world: int, name: str = "attention") -> HeadLayout:
    """Which query and key/value heads each of ``world`` ranks holds (no communication).

    Raises ``ValueError`` naming ``name`` and the numbers when no layout gives every rank
    at least one query head with all the key/value heads it needs.

    Example::

        >>> head_layout(6, 2, 4).q      # KV groups of 3 query heads, 2 ranks per group
        ((0, 2), (2, 3), (3, 5), (5, 6))
        >>> head_layout(6, 2, 4).kv
        ((0, 1), (0, 1), (1, 2), (1, 2))
    """
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(
            f"{name}: num_attention_heads={heads} must be a positive multiple of "
            f"num_key_value_heads={kv_heads}."
        )
    group = heads // kv_heads
    if kv_heads >= world:
        kv = _spans(_split(kv_heads, world))
        q = tuple((a * group, b * group) for a, b in kv)
        return HeadLayout(heads, kv_heads, world, q, kv)
    if world % kv_heads:
        raise ValueError(
            f"{name}: num_key_value_heads={kv_heads} is smaller than the tensor-parallel size "
            f"{world} and does not divide it, so key/value heads cannot be replicated evenly "
            "(use a tensor-parallel size that divides or is a multiple of it)."
        )
    per_group = world // kv_heads  # ranks sharing one key/value head
    if group < per_group:
        raise ValueError(
            f"{name}: {heads} attention heads in {kv_heads} key/value groups give {group} "
            f"query head(s) per group, fewer than the {per_group} ranks that would share each "
            f"group at tensor-parallel size {world}; every rank needs a query head."
        )
    shares = _spans(_split(group, per_group))
    q = tuple(
        (
            r // per_group * group + shares[r % per_group][0],
            r // per_group * group + shares[r % per_group][1],
        )
        for r in range(world)
    )
    kv = tuple((r // per_group, r // per_group + 1) for r in range(world))
    return HeadLayout(heads, kv_heads, world, q, kv)


# Attributes HF attention modules keep about the whole model, and what each counts.
_Q_COUNTS = ("num_heads", "num_attention_heads")
_KV_COUNTS = ("num_key_value_heads",)
_Q_WIDTHS = ("split_size", "all_head_size")  # query heads * head_dim (GPT-2, BERT)
_GROUPS = "num_key_value_groups"


class AttentionHeads(ModuleStyle):
    """Validate an attention module's head split and set its head attributes to local counts.

    Put it on the attention module (``"model.layers.*.self_attn"``), *before* the entries
    for its projections, so that an indivisible head count fails here, by name, before any
    weight moves. It shards nothing itself; it rewrites whichever of ``num_heads``,
    ``num_attention_heads``, ``num_key_value_heads``, ``num_key_value_groups``,
    ``split_size`` and ``all_head_size`` the module has, after checking that each holds
    the full-model value the plan expects.

    Args:
        heads: query heads of the whole model.
        kv_heads: key/value heads (``None``: same as ``heads``, plain multi-head attention).

    Keyword Args:
        head_dim: features per head.
        uneven: accept a layout that is not an even contiguous split (replicated KV heads,
            uneven query heads). Only valid when the projections use
            :class:`ColwiseHeads`/:class:`RowwiseHeads` where the split is uneven;
            :func:`shardwise.hf.auto_plan` with ``tp_size`` arranges that.

    Example::

        >>> attn = "model.layers.*.self_attn"
        >>> parallelize_module(model, mesh, {attn: AttentionHeads(4, 2, head_dim=16),
        ...                                  f"{attn}.q_proj": ColwiseParallel(), ...})
    """

    def __init__(
        self, heads: int, kv_heads: int | None = None, *, head_dim: int, uneven: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = heads if kv_heads is None else kv_heads
        self.head_dim = head_dim
        self.uneven = uneven

    def __repr__(self) -> str:
        extra = ", uneven=True" if self.uneven else ""
        return (
            f"AttentionHeads(heads={self.heads}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}{extra})"
        )

    def _values(self, q: int, kv: int) -> dict[str, int]:
        values = {a: q for a in _Q_COUNTS} | {a: kv for a in _KV_COUNTS}
        values |= {a: q * self.head_dim for a in _Q_WIDTHS}
        values[_GROUPS] = q // kv
        return values

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise ``ValueError`` (no communication) if the heads cannot be split on ``mesh``.

        Example::

            >>> AttentionHeads(6, head_dim=8).check(attn, "h.0.attn", mesh)   # 4 ranks
            Traceback (most recent call last):
            ValueError: h.0.attn: 6 attention heads and 6 key/value heads do not split evenly ...
        """
        name = fqn or type(module).__name__
        world = mesh.size()
        layout = head_layout(self.heads, self.kv_heads, world, name)
        if not layout.even and not self.uneven:
            raise ValueError(
                f"{name}: {self.heads} attention heads and {self.kv_heads} key/value heads do "
                f"not split evenly over tensor-parallel size {world}; each rank needs whole "
                f"heads, so both must be divisible by {world}. "
                f"shardwise.hf.parallelize_hf (auto_plan(model, tp_size={world})) replicates "
                "key/value heads or splits query heads by group where that is possible."
            )
        for attr, full in self._values(self.heads, self.kv_heads).items():
            value = getattr(module, attr, None)
            if isinstance(value, int) and value != full:
                raise ValueError(
                    f"{name}.{attr}={value}, but the plan expects {full} for {self.heads} heads, "
                    f"{self.kv_heads} key/value heads of size {self.head_dim} (already "
                    "parallelized, or a plan built for another model?)."
                )

    def apply(self, module: Any, mesh: Any) -> Any:
        """Set this rank's head counts on ``module``; returns it.

        Example::

            >>> AttentionHeads(4, 2, head_dim=16).apply(attn, mesh).num_key_value_groups
        """
        layout = head_layout(self.heads, self.kv_heads, mesh.size())
        rank = mesh.get_local_rank()
        (q0, q1), (k0, k1) = layout.q[rank], layout.kv[rank]
        for attr, value in self._values(q1 - q0, k1 - k0).items():
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)
        return module


# -- replicated projections with per-rank head slices ----------------------------------------


def _check_head_linear(
    module: Any, fqn: str, features: int, label: str, want: int, style: str
) -> None:
    name = fqn or type(module).__name__
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"Expect a torch.nn.Linear module but received {type(module)}! ({style} on '{name}')"
        )
    check_installable(module, name, nn.Linear, style)
    if features != want:
        raise ValueError(f"{name}: {style} expects {label}={want}, but the module has {features}.")


class _HeadsForward(ParallelForward):
    """Forward of a replicated Linear that computes only this rank's head rows/columns."""

    base = nn.Linear

    def __init__(self, span: slice, group: ProcessGroup, summed: frozenset[str]) -> None:
        self.span, self.group, self.summed = span, group, summed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(features {self.span.start}:{self.span.stop})"


class _ColumnHeadsForward(_HeadsForward):
    """Replicated input in, this rank's heads out (one shared *f* per activation)."""

    input_layout = Replicate()
    output_layout = Shard(-1)

    def __call__(
        self, module: nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        w, b = self.param(module, "weight"), self.param(module, "bias")
        assert w is not None
        bias = None if b is None else b[self.span]
        return F.linear(shared_entry("f", x, self.group, 0), w[self.span], bias)  # [.., heads_r*D]


class _RowHeadsForward(_HeadsForward):
    """This rank's heads in, partial sums all-reduced, the bias added after."""

    output_layout = Replicate()

    def __call__(
        self, module: nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        w, b = self.param(module, "weight"), self.param(module, "bias")
        assert w is not None
        y = C.reduce_from_region(F.linear(x, w[:, self.span]), self.group)  # [.., hidden]
        return y if b is None else y + b


class ColwiseHeads(ModuleStyle):
    """q, k or v projection whose heads do not split evenly: replicated weight, own rows.

    * Parameters: ``Replicate`` DTensors; the local gradient (non-zero on this rank's rows
      only, or partial where ranks share a KV head) is all-reduced over the TP group.
    * Input: replicated; one shared *f* per activation (one all-reduce in backward for
      all projections of this style reading it).
    * Output: this rank's heads ``[..., heads_r * head_dim]`` as a plain tensor.

    Args:
        heads, kv_heads: head counts of the whole model.

    Keyword Args:
        head_dim: features per head.
        part: ``"q"`` (query heads) or ``"kv"`` (key/value heads).

    Example::

        >>> plan["model.layers.*.self_attn.k_proj"] = ColwiseHeads(4, 2, head_dim=16, part="kv")
    """

    def __init__(
        self, heads: int, kv_heads: int, *, head_dim: int, part: Literal["q", "kv"]
    ) -> None:
        super().__init__()
        if part not in ("q", "kv"):
            raise ValueError(f"part must be 'q' or 'kv', got {part!r}")
        self.heads, self.kv_heads, self.head_dim, self.part = heads, kv_heads, head_dim, part

    def __repr__(self) -> str:
        return (
            f"ColwiseHeads(heads={self.heads}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, part={self.part!r})"
        )

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) on a non-Linear or a size that does not match the heads.

        Example::

            >>> ColwiseHeads(4, 2, head_dim=16, part="kv").check(attn.k_proj, "k_proj", mesh)
        """
        count = self.heads if self.part == "q" else self.kv_heads
        features = getattr(module, "out_features", -1)
        _check_head_linear(module, fqn, features, "out_features", count * self.head_dim, repr(self))
        head_layout(self.heads, self.kv_heads, mesh.size(), fqn)

    def apply(self, module: Any, mesh: Any) -> Any:
        """Replicate the weights and install the head-slice forward; returns ``module``.

        Example::

            >>> ColwiseHeads(4, 2, head_dim=16, part="kv").apply(attn.k_proj, mesh)
        """
        layout = head_layout(self.heads, self.kv_heads, mesh.size())
        start, stop = (layout.q if self.part == "q" else layout.kv)[mesh.get_local_rank()]
        distribute_parameter(module, "weight", mesh, Replicate(), sum_grads=True)
        distribute_parameter(module, "bias", mesh, Replicate(), sum_grads=True)
        span = slice(start * self.head_dim, stop * self.head_dim)
        _ColumnHeadsForward(span, mesh.get_group(), frozenset({"weight", "bias"})).install(module)
        return module


class RowwiseHeads(ModuleStyle):
    """Output projection after unevenly split heads: replicated weight, own input columns.

    * Input: this rank's heads ``[..., heads_r * head_dim]`` (what attention produced).
    * Output: the full result, identical on every rank, as a plain tensor.
    * Forward: one all-reduce; the bias is added after it, so its gradient is complete on
      every rank. The weight gradient (this rank's columns) is all-reduced in backward.

    Example::

        >>> plan["model.layers.*.self_attn.o_proj"] = RowwiseHeads(6, 2, head_dim=16)
    """

    def __init__(self, heads: int, kv_heads: int, *, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def __repr__(self) -> str:
        return (
            f"RowwiseHeads(heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim})"
        )

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) on a non-Linear or a size that does not match the heads.

        Example::

            >>> RowwiseHeads(6, 2, head_dim=16).check(attn.o_proj, "o_proj", mesh)
        """
        features = getattr(module, "in_features", -1)
        _check_head_linear(
            module, fqn, features, "in_features", self.heads * self.head_dim, repr(self)
        )
        head_layout(self.heads, self.kv_heads, mesh.size(), fqn)

    def apply(self, module: Any, mesh: Any) -> Any:
        """Replicate the weights and install the head-slice forward; returns ``module``.

        Example::

            >>> RowwiseHeads(6, 2, head_dim=16).apply(attn.o_proj, mesh)
        """
        layout = head_layout(self.heads, self.kv_heads, mesh.size())
        start, stop = layout.q[mesh.get_local_rank()]
        distribute_parameter(module, "weight", mesh, Replicate(), sum_grads=True)
        distribute_parameter(module, "bias", mesh, Replicate(), sum_grads=False)  # added after the all-reduce
        span = slice(start * self.head_dim, stop * self.head_dim)
        _RowHeadsForward(span, mesh.get_group(), frozenset({"weight"})).install(module)
        return module
