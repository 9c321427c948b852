"""Tensor-parallel multi-head attention: whole heads per rank, one all-reduce per forward.

:class:`TensorParallelMultiheadAttention` (TPMA) computes exactly what
``nn.MultiheadAttention`` computes, but keeps its input projection in a *per-head* row
layout so that ``Shard(0)`` of ``qkv`` hands every rank whole heads (Megatron-LM,
arXiv:1909.08053, section 3):

* ``qkv`` is column-parallel: rank r holds heads ``[r*H/W, (r+1)*H/W)``, no communication;
* attention runs on the local heads only, on plain local tensors;
* ``proj`` is row-parallel: the partial sums of the heads are all-reduced (or
  reduce-scattered on dim 0 under :class:`~shardwise.style.SequenceParallel`).

Example::

    >>> mha = nn.MultiheadAttention(16, 4)
    >>> tpma = parallelize_module(mha, mesh, PairwiseParallel())   # swapped: use the result
    >>> out, weights = tpma(x, x, x)                                 # same numbers as mha(x, x, x)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ._engine import collectives as C
from ._engine.io import ModuleIO
from ._engine.sharded_linear import ColumnLinearForward, RowLinearForward

__all__ = ["TensorParallelMultiheadAttention", "check_attention", "parallelize_attention"]


def _unsupported(add_bias_kv: bool, add_zero_attn: bool, same_dims: bool, name: str) -> None:
    features = [
        ("add_bias_kv", add_bias_kv),
        ("add_zero_attn", add_zero_attn),
        ("kdim/vdim different from embed_dim", not same_dims),
    ]
    for feature, on in features:
        if on:
            raise NotImplementedError(
                f"{name}: tensor-parallel attention does not support {feature}."
            )


def _check_heads(embed_dim: int, num_heads: int, tp_size: int, name: str) -> None:
    if num_heads <= 0 or embed_dim % num_heads != 0:
        raise ValueError(
            f"{name}: embed_dim={embed_dim} must be divisible by num_heads={num_heads}."
        )
    if num_heads % tp_size != 0:
        raise ValueError(
            f"{name}: num_heads={num_heads} is not divisible by the tensor-parallel size "
            f"{tp_size}; every rank must hold whole heads."
        )


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as something to add to the scores: bool ``True`` means "not allowed"."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, -math.inf
        )
    if not mask.is_floating_point():
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class TensorParallelMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with a head-sharded projection layout, for tensor parallelism.

    Same constructor as the seed and the same ``forward`` as ``nn.MultiheadAttention``: it
    returns ``(output, weights)`` (``weights`` is ``None`` when ``need_weights=False``) and
    honours ``batch_first``, unbatched ``(L, E)`` inputs, 2-D ``(L, S)`` and 3-D
    ``(N*num_heads, L, S)`` ``attn_mask`` and ``(N, S)`` ``key_padding_mask`` (bool: ``True``
    masks out; float: added to the scores), ``average_attn_weights`` and dropout (training
    only; under TP each rank draws the dropout mask of its own heads).

    * ``self_attention=True``: one ``qkv = Linear(E, 3E)`` whose rows are grouped per head
      (``[q_h; k_h; v_h]``, ``3*head_dim`` rows each). ``query``, ``key`` and ``value`` must
      be the same tensor (or equal); only ``query`` is projected.
    * ``self_attention=False`` (cross attention, supported): ``query``/``key``/``value`` are
      separate ``Linear(E, E)``; all three are column-parallel when sharded.
    * ``proj = Linear(E, E)`` is the output projection. ``bias`` controls every bias.

    ``tp_size`` is only checked (``num_heads`` must be divisible by it): the result never
    depends on it. ``add_bias_kv``, ``add_zero_attn`` and ``kdim``/``vdim`` other than
    ``embed_dim`` raise ``NotImplementedError``. After parallelization the masks describe
    the global (for SequenceParallel, the gathered) input, and the returned ``weights`` are
    the global ones, identical on every rank (their gradient assumes every rank uses
    them the same way).

    Example::

        >>> attn = TensorParallelMultiheadAttention(16, 4, batch_first=True).copy(mha)
        >>> out, weights = attn(x, x, x, key_padding_mask=pad)
    """

    # nn.TransformerEncoderLayer's inference fast path reads ``self_attn.in_proj_bias``;
    # None makes it take the ordinary path (TPMA has no packed ``in_proj``).
    in_proj_bias: None = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tp_size: int = 1,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        same_dims = kdim in (None, embed_dim) and vdim in (None, embed_dim)
        _unsupported(add_bias_kv, add_zero_attn, same_dims, name)
        _check_heads(embed_dim, num_heads, tp_size, name)
        self.embed_dim = embed_dim
        self.kdim = self.vdim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.tp_size = tp_size
        self.self_attention = self_attention
        # The plan's TensorParallelRNG (set by parallelize_module): per-rank dropout masks.
        self.sharded_rng: Any = None
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if self_attention:
            self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        else:
            self.query = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.key = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.value = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _in_projections(self) -> list[nn.Linear]:
        return [self.qkv] if self.self_attention else [self.query, self.key, self.value]

    def _reset_parameters(self) -> None:
        # As nn.MultiheadAttention: Xavier-uniform input projection, zero biases.
        for linear in self._in_projections():
            nn.init.xavier_uniform_(linear.weight)
        for linear in [*self._in_projections(), self.proj]:
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    # -- building from nn.MultiheadAttention ---------------------------------------------
    @classmethod
    def from_multihead_attention(
        cls, mha: nn.MultiheadAttention, tp_size: int = 1
    ) -> TensorParallelMultiheadAttention:
        """A self-attention TPMA with ``mha``'s configuration (batch_first, dropout, bias,
        dtype, device, training mode) and weights.

        Example::

            >>> tpma = TensorParallelMultiheadAttention.from_multihead_attention(mha)
        """
        check_attention(mha, type(mha).__name__, tp_size)
        weight = mha.out_proj.weight
        tpma = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
            tp_size=tp_size,
        )
        return tpma.copy(mha).train(mha.training)

    @torch.no_grad()
    def copy(self, that: nn.MultiheadAttention) -> TensorParallelMultiheadAttention:
        """Copy ``that``'s weight values into this module (re-ordering rows per head); returns self.

        Example::

            >>> tpma = TensorParallelMultiheadAttention(16, 4).copy(nn.MultiheadAttention(16, 4))
        """
        name = type(self).__name__
        if not isinstance(that, nn.MultiheadAttention):
            raise TypeError(
                f"{name}.copy expects an nn.MultiheadAttention, got {type(that).__name__}"
            )
        _unsupported(that.bias_k is not None, that.add_zero_attn, that._qkv_same_embed_dim, name)
        if (that.embed_dim, that.num_heads) != (self.embed_dim, self.num_heads):
            raise ValueError(
                f"{name}.copy: embed_dim/num_heads differ: {that.embed_dim}/{that.num_heads} "
                f"vs {self.embed_dim}/{self.num_heads}."
            )
        if (that.in_proj_bias is None) != (self.proj.bias is None):
            raise ValueError(f"{name}.copy: bias presence differs between the two modules.")
        if any(isinstance(p, DTensor) for p in self.parameters()):
            raise RuntimeError(f"{name}.copy: copy weights before parallelizing the module.")
        h, d, e = self.num_heads, self.head_dim, self.embed_dim
        w, b = that.in_proj_weight, that.in_proj_bias
        if self.self_attention:
            # [W_q; W_k; W_v] -> per head [q_h; k_h; v_h]: Shard(0) then gives whole heads.
            self.qkv.weight.copy_(w.view(3, h, d, e).transpose(0, 1).reshape(3 * e, e))
            if b is not None:
                self.qkv.bias.copy_(b.view(3, h, d).transpose(0, 1).reshape(3 * e))
        else:
            for i, linear in enumerate(self._in_projections()):
                linear.weight.copy_(w[i * e : (i + 1) * e])
                if b is not None:
                    linear.bias.copy_(b[i * e : (i + 1) * e])
        self.proj.weight.copy_(that.out_proj.weight)
        if that.out_proj.bias is not None:
            self.proj.bias.copy_(that.out_proj.bias)
        return self

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention as ``nn.MultiheadAttention.forward``; ``key``/``value`` default to ``query``.

        Example::

            >>> out, _ = attn(x, x, x, need_weights=False)   # x: [L, N, E] (or [N, L, E])
        """
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        unbatched = query.dim() == 2
        q, k, v = self._project(query, key, value, unbatched)  # each [N, H/W, L or S, hd]
        group, rank = self._tp_group()
        p = self.dropout if self.training else 0.0
        causal_only = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal_only else self._mask(attn_mask, key_padding_mask, q, k, rank)
        weights = None
        # Each rank's heads draw their own dropout mask, from the TP-aware sharded stream.
        rng = self.sharded_rng
        with rng.sharded() if rng is not None and p > 0 else contextlib.nullcontext():
            if need_weights:
                scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
                if mask is not None:
                    scores = scores + mask
                attn = scores.softmax(dim=-1)
                attn = F.dropout(attn, p=p) if p > 0 else attn
                ctx = torch.matmul(attn, v)  # [N, H/W, L, hd]
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal_only)
        if need_weights:
            weights = self._global_weights(attn, group, average_attn_weights)
        out = self.proj(self._merge_heads(ctx, unbatched))
        if unbatched and weights is not None:
            weights = weights.squeeze(0)
        return out, weights

    def _tp_group(self) -> tuple[ProcessGroup | None, int]:
        """The TP group and this rank's place in it, or ``(None, 0)`` when not sharded."""
        weight = self._in_projections()[0].weight
        if isinstance(weight, DTensor) and weight.device_mesh.size() > 1:
            mesh = weight.device_mesh
            return mesh.get_group(), mesh.get_local_rank()
        return None, 0

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, unbatched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.self_attention:
            if not (query is key is value) and not (
                torch.equal(query, key) and torch.equal(query, value)
            ):
                raise AssertionError(
                    "inputs are different for self-attention (self_attention=True needs "
                    "query, key and value to be the same tensor; build the module with "
                    "self_attention=False for cross attention)."
                )
            # The projections of the raw layout keep dim 0 where SequenceParallel gathers it.
            q, k, v = self._split_heads(self.qkv(query), 3, unbatched)
            return q, k, v
        (q,) = self._split_heads(self.query(query), 1, unbatched)
        (k,) = self._split_heads(self.key(key), 1, unbatched)
        (v,) = self._split_heads(self.value(value), 1, unbatched)
        return q, k, v

    def _split_heads(self, y: Tensor, parts: int, unbatched: bool) -> list[Tensor]:
        """``[L, N, (H/W)*parts*hd]`` (or batch-first / unbatched) -> ``parts`` x ``[N, H/W, L, hd]``.

        The local head count comes from the local width, so this is the same code sharded
        or not.
        """
        if unbatched:
            y = y.unsqueeze(0)  # [1, L, ...]
        elif not self.batch_first:
            y = y.transpose(0, 1)  # [N, L, ...]
        y = y.reshape(*y.shape[:-1], -1, parts, self.head_dim)  # [N, L, H/W, parts, hd]
        return [y[..., i, :].transpose(1, 2) for i in range(parts)]

    def _merge_heads(self, ctx: Tensor, unbatched: bool) -> Tensor:
        y = ctx.transpose(1, 2).flatten(2)  # [N, L, (H/W)*hd]: this rank's slice of E
        if unbatched:
            return y.squeeze(0)
        return y if self.batch_first else y.transpose(0, 1)

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        q: Tensor,
        k: Tensor,
        rank: int,
    ) -> Tensor | None:
        """Both masks merged into one additive ``[N|1, H/W|1, L, S]`` mask for the local heads."""
        n, local_heads, tgt, src = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, q.dtype)
            if m.shape in ((tgt, src), (1, tgt, src)):
                mask = m.view(1, 1, tgt, src)
            elif m.shape == (n * self.num_heads, tgt, src):
                first = rank * local_heads  # this rank holds heads [first, first + H/W)
                mask = m.view(n, self.num_heads, tgt, src)[:, first : first + local_heads]
            else:
                raise RuntimeError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} does not fit: expected "
                    f"({tgt}, {src}) or ({n * self.num_heads}, {tgt}, {src})."
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape[-1] != src or key_padding_mask.numel() != n * src:
                raise RuntimeError(
                    f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not fit: "
                    f"expected ({n}, {src})."
                )
            pad = _additive(key_padding_mask, q.dtype).reshape(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask

    def _global_weights(self, attn: Tensor, group: ProcessGroup | None, average: bool) -> Tensor:
        """Attention weights over all heads from this rank's ``[N, H/W, L, S]`` ones."""
        if average:
            total = attn.sum(dim=1)  # [N, L, S], this rank's heads
            if group is not None:
                total = C.reduce_from_region(total, group)
            return total / self.num_heads
        return attn if group is None else C.gather_from_region(attn, group, dim=1)


# -- parallelize_module hooks ---------------------------------------------------------------
def check_attention(module: nn.Module, fqn: str, world: int) -> None:
    """Raise, without communicating, if ``module`` cannot be head-sharded over ``world`` ranks.

    ``ValueError`` (mentions "divisible") for a head count ``world`` does not divide;
    ``NotImplementedError`` for nn.MultiheadAttention features TPMA lacks (``add_bias_kv``,
    ``add_zero_attn``, ``kdim``/``vdim`` other than ``embed_dim``).

    Example::

        >>> check_attention(nn.MultiheadAttention(24, 6), "attn", 4)
        Traceback (most recent call last):
        ValueError: attn: num_heads=6 is not divisible by the tensor-parallel size 4; ...
    """
    name = fqn or type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        same_dims = module._qkv_same_embed_dim
        _unsupported(module.bias_k is not None, module.add_zero_attn, same_dims, name)
        # embed_dim % world follows: embed_dim = num_heads * head_dim.
        _check_heads(module.embed_dim, module.num_heads, world, name)
        return
    if not isinstance(module, TensorParallelMultiheadAttention):
        raise TypeError(f"{name}: expected an attention module, got {type(module).__name__}")
    _check_heads(module.embed_dim, module.num_heads, world, name)
    prefix = f"{fqn}." if fqn else ""
    for child, linear in module.named_children():
        if isinstance(linear, nn.Linear):
            forward = RowLinearForward if child == "proj" else ColumnLinearForward
            forward.check(linear, prefix + child, world)  # also: not parallelized twice


def parallelize_attention(
    module: nn.Module, mesh: DeviceMesh, input_io: ModuleIO, output_io: ModuleIO
) -> TensorParallelMultiheadAttention:
    """Head-shard ``module`` on the 1-D ``mesh``; an nn.MultiheadAttention is swapped for a TPMA.

    The input projections become column-parallel taking their input as ``input_io``
    says, and the output projection row-parallel returning as ``output_io`` says:
    replicated in, all-reduce out for PairwiseParallel; all-gather of dim 0 in,
    reduce-scatter of dim 0 out for SequenceParallel. Call :func:`check_attention`
    first: this function communicates. Returns the module to register in place of
    ``module``.

    Example::

        >>> tpma = parallelize_attention(nn.MultiheadAttention(16, 4), mesh,
        ...                              ModuleIO(Replicate(), Shard(-1)), ModuleIO(Shard(-1), Replicate()))
    """
    if isinstance(module, nn.MultiheadAttention):
        module = TensorParallelMultiheadAttention.from_multihead_attention(module, mesh.size())
    if not isinstance(module, TensorParallelMultiheadAttention):
        raise TypeError(f"expected an attention module, got {type(module).__name__}")
    for linear in module._in_projections():
        ColumnLinearForward.parallelize(linear, mesh, input_io)
    RowLinearForward.parallelize(module.proj, mesh, output_io)
    return module
