"""Column-parallel layers on a sequence shard that save the *shard*, not the gathered input.

With sequence parallelism a column-parallel Linear receives this rank's sequence shard
``[S/t, ...]``, all-gathers it to ``[S, ...]`` and multiplies. ``F.linear`` would save
that gathered input for the weight gradient: one full-sequence activation per layer
that survives into backward, which is exactly what sequence parallelism is meant to
divide by t. Megatron-LM (Korthikanti et al. 2022, section 4.2.2) saves the shard
instead and all-gathers it again in backward, overlapping that all-gather with the
input-gradient matmul. :func:`linear_saving_shard` does the same:

* forward: ``y = x_full @ W.T + b`` on the gathered input (gathered once per activation
  and shared by q, k and v, as before); autograd saves the shard and the weight only;
* backward: the all-gather of the shard is started asynchronously, ``grad_x_full =
  grad_y @ W`` runs while it is on the wire, then ``grad_W = grad_y.T @ x_full``. The
  layers that read one activation (q, k, v) share that all-gather too: the first to run
  its backward gathers, the last releases the result.

The input gradient still flows through the entry's own backward (one reduce-scatter for
q, k and v together), so forward communication is unchanged and backward gains one
all-gather per gathered activation.

Which is better:

* saving the shard (the default) divides every column layer's saved input by t, the
  point of sequence parallelism; it costs one extra all-gather per gathered activation
  in backward, mostly hidden behind the input-gradient matmul;
* saving the gathered input (``ColwiseParallel(..., save_gathered_input=True)`` or
  ``SequenceParallel(save_gathered_input=True)``, decided per layer when its forward is
  installed) costs no extra collective, but (t-1)/t of each gathered input more memory
  per layer. Prefer it when activations are small next to the weights (short
  sequences, small batches: the whole step's activations fit easily) and the step
  time is dominated by latency, not bandwidth, e.g. gloo or many small layers.

Example::

    >>> parallelize_module(model, mesh, {"q": ColwiseParallel(input_layouts=Shard(1),
    ...                                                     save_gathered_input=True)})
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .torch_compat import all_gather_single

__all__ = ["linear_saving_shard"]


class _Regather:
    """The gathered input of the column layers that read one sequence shard, rebuilt in backward.

    ``users`` counts the layers that will ask for it; the first to ask all-gathers, the
    rest reuse that result, and the last one lets it go (a second backward through a
    retained graph gathers afresh).
    """

    __slots__ = ("dim", "group", "held", "users")

    def __init__(self, group: ProcessGroup, dim: int) -> None:
        self.group, self.dim = group, dim
        self.users = 0
        self.held: torch.Tensor | None = None

    def start(self, shard: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Begin gathering ``shard``: ``(buffer, work)``, the buffer with the gathered dim first."""
        if self.held is not None:
            return self.held, None
        xt = shard.movedim(self.dim, 0).contiguous()
        world = dist.get_world_size(self.group)
        if world == 1:
            return xt, None
        out = torch.empty((world * xt.shape[0], *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
        work = all_gather_single(out, xt, group=self.group, async_op=True)
        return out, work

    def finish(self, started: tuple[torch.Tensor, Any]) -> torch.Tensor:
        buf, work = started
        if work is not None:
            work.wait()
        self.users -= 1
        self.held = buf if self.users > 0 else None
        return buf


class _LinearSavingShard(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        full: torch.Tensor,
        shard: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        regather: _Regather,
    ) -> torch.Tensor:
        ctx.save_for_backward(shard, weight)
        ctx.regather = regather
        regather.users += 1
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        shard, weight = ctx.saved_tensors
        regather: _Regather = ctx.regather
        started = regather.start(shard)
        # The input gradient first, while the all-gather is on the wire.
        grad_full = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        gathered = regather.finish(started)  # [S, ...] gathered dim first
        grad_weight = grad_bias = None
        out_features = grad.shape[-1]
        if ctx.needs_input_grad[2]:
            dim = regather.dim
            if dim == grad.dim() - 1:  # a feature shard: put it back in place
                x2d = gathered.movedim(0, dim).reshape(-1, weight.shape[-1])
                g = grad.reshape(-1, out_features)
            else:
                # The buffer holds rows in gathered-dim-first order; move the gradient's
                # gathered dim first too (a copy of the smaller tensor, none for dim 0).
                x2d = gathered.reshape(-1, gathered.shape[-1])
                g = grad.movedim(dim, 0).reshape(-1, out_features)
            grad_weight = g.t().mm(x2d)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, out_features).sum(0)
        return grad_full, None, grad_weight, grad_bias, None


def linear_saving_shard(
    full: torch.Tensor,
    shard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: ProcessGroup,
    dim: int,
) -> torch.Tensor:
    """``F.linear(full, weight, bias)`` that saves ``shard`` and re-gathers it in backward.

    ``full`` is the all-gather of ``shard`` along ``dim`` (every rank's shard the same
    length), produced by an autograd collective whose backward reduce-scatters the input
    gradient; this function returns that gradient to ``full`` unchanged. Layers reading
    the same ``full`` share one all-gather in backward.

    Example::

        >>> full = gather_from_sequence_region(x_shard, group, dim=0)
        >>> y = linear_saving_shard(full, x_shard, w, b, group, dim=0)
    """
    dim = dim % shard.dim()
    regather = getattr(full, "_shardwise_regather", None)
    if regather is None or regather.dim != dim or regather.group is not group:
        regather = _Regather(group, dim)
        full._shardwise_regather = regather  # type: ignore[attr-defined]
    out: torch.Tensor = _LinearSavingShard.apply(full, shard.detach(), weight, bias, regather)
    return out
