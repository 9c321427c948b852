"""``verify``: run a plan next to the single-device model and say where they first part.

Numerics comparers list every tensor that differs; after the first divergence almost
everything downstream differs too, so the list hides the one place to look. ``verify``
walks both copies in execution order and stops at the first difference:

* **forward**: each module's input and output, the parallel copy's pieces put
  together by their layout (a DTensor's placement, the layout a parallelized module
  declares, or else the one the shapes imply);
* **backward** (of a scalar loss): the gradient arriving at each module's output and
  every parameter gradient, in the order autograd computes them;
* **step**: every parameter after each optimizer step.

Comparing inputs as well as outputs tells a module that computes wrongly from code
*between* modules that hands it wrong inputs ("inputs of fc2 already differ although
fc1 matched"), which is where most plan bugs live: a softmax or norm over a sharded
feature dimension, a head count taken from the local width, a plain parameter whose
gradient misses the sum over the TP group.

Example::

    >>> result = shardwise.verify(MLP(), {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()},
    ...                           torch.randn(4, 16), steps=2)
    >>> result.ok
    True
"""

from __future__ import annotations

import copy
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from .._engine import collectives as C
from ..api import Plan, parallelize_module
from ..optim import foreach_param_groups
from .tolerance import tolerance
from .verify_record import Piece, Recorder, first_tensor, piece
from .verify_report import Divergence, Judge, VerifyResult

__all__ = ["Divergence", "VerifyResult", "verify"]

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _param_pieces(model: nn.Module, grads: bool) -> dict[str, Piece]:
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        out[name] = piece(t, Replicate())
    return out


def _full_output(
    out: torch.Tensor, layout: Placement | None, size: torch.Size, group: Any
) -> torch.Tensor:
    """The global root output, differentiably, from this rank's piece."""
    if isinstance(out, DTensor):
        return out.full_tensor()
    if isinstance(layout, Shard):
        return C.gather_from_region(out, group, layout.dim, size[layout.dim])
    if isinstance(layout, Partial):
        return C.reduce_from_region(out, group)
    return out


class _Group:
    """Gather to and broadcast from the TP group's first rank."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.group = mesh.get_group()
        self.lead = dist.get_rank(self.group) == 0
        self.src = dist.get_global_rank(self.group, 0)
        self.size = mesh.size()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] | None = [None] * self.size if self.lead else None
        dist.gather_object(obj, out, dst=self.src, group=self.group)
        return out or []

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def decide(self, payload: Any, judge: Callable[..., Any], *args: Any) -> Any:
        """Gather ``payload``; on the first rank, ``judge(gathered, *args)``; broadcast its result.

        An error there is broadcast too and raised on every rank, so none is left waiting.
        """
        gathered = self.gather(payload)
        verdict: Any = None
        if self.lead:
            try:
                verdict = ("ok", judge(gathered, *args))
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                verdict = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        status, value = self.broadcast(verdict)
        if status == "error":
            raise RuntimeError(
                f"verify: the single-device reference failed on the first rank: {value}"
            )
        return value


def _weighted_sum(step: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The default loss: a fixed random weighting of every output element (seeded by step)."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + step))
        return (y.float() * weights).sum()

    return loss


@dataclass
class _Run:
    """One verification inside a job: the parallel copy on every rank, the reference on the first.

    Each phase gathers the TP ranks' records to the first rank, which runs the reference
    for that phase and judges; the verdict (or the reference's error) is broadcast, so
    every rank returns or raises together.
    """

    g: _Group
    tp: nn.Module
    ref: nn.Module | None  # only on the TP group's first rank
    judge: Judge | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None

    def __post_init__(self) -> None:
        self.opt_tp = torch.optim.SGD(
            foreach_param_groups(self.tp.parameters()), lr=0.05, momentum=0.9
        )
        self.opt_ref = (
            None
            if self.ref is None
            else torch.optim.SGD(self.ref.parameters(), lr=0.05, momentum=0.9)
        )
        self.rec_ref: Recorder | None = None
        self.out_ref: torch.Tensor | None = None

    def step(self, step: int) -> Divergence | None:
        """Forward, backward and optimizer step, compared in that order; the first divergence."""
        loss = self.loss_fn or _weighted_sum(step)
        with Recorder(self.tp) as rec_tp:
            out_tp = first_tensor(self.tp(*self.args, **self.kwargs))
        found, root, shape = self.g.decide({r.key: r for r in rec_tp.forward}, self._forward, step)
        if found is not None:
            return found
        if out_tp is None or not out_tp.is_floating_point():
            raise TypeError(
                "verify needs a model whose output (or its first tensor) is floating point"
            )
        loss(_full_output(out_tp, root, shape, self.g.group)).backward()
        grads = ({r.key: r for r in rec_tp.backward}, _param_pieces(self.tp, grads=True))
        found = self.g.decide(grads, self._backward, loss)
        if found is not None:
            return found
        self.opt_tp.step()
        self.opt_tp.zero_grad()
        return self.g.decide(_param_pieces(self.tp, grads=False), self._params)

    # The reference's side of each phase, on the first rank, given every rank's records.
    def _forward(
        self, ranks: list[Any], step: int
    ) -> tuple[Divergence | None, Placement | None, Any]:
        assert self.ref is not None and self.judge is not None
        self.judge.step = step
        with Recorder(self.ref, param_order=True) as self.rec_ref:
            self.out_ref = first_tensor(self.ref(*self.args, **self.kwargs))
        found, root = self.judge.forward(self.rec_ref.forward, ranks)
        return found, root, None if self.out_ref is None else self.out_ref.shape

    def _backward(
        self, ranks: list[Any], loss: Callable[[torch.Tensor], torch.Tensor]
    ) -> Divergence | None:
        assert self.ref is not None and self.judge is not None and self.rec_ref is not None
        assert self.out_ref is not None
        loss(self.out_ref).backward()
        ref_grads = {n: p.grad for n, p in self.ref.named_parameters()}
        return self.judge.backward(
            self.rec_ref.backward, ref_grads, [r[0] for r in ranks], [r[1] for r in ranks]
        )

    def _params(self, ranks: list[Any]) -> Divergence | None:
        assert self.ref is not None and self.judge is not None and self.opt_ref is not None
        self.opt_ref.step()
        self.opt_ref.zero_grad()
        return self.judge.params({n: p.detach() for n, p in self.ref.named_parameters()}, ranks)


def _verify_in_job(
    build: Callable[[], nn.Module],
    plan: Plan,
    example_inputs: Any,
    mesh: DeviceMesh,
    steps: int,
    atol: float | None,
    rtol: float | None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> VerifyResult:
    if mesh.ndim != 1:
        raise ValueError(
            f"verify expects the 1-D tensor-parallel mesh (e.g. mesh['tp']), got {mesh.ndim} dims."
        )
    g = _Group(mesh)
    torch.manual_seed(0)
    tp = build()
    ref = copy.deepcopy(tp).eval() if g.lead else None
    tp = parallelize_module(tp, mesh, plan).eval()
    judge: Judge | None = None
    if ref is not None:
        dtype = next((p.dtype for p in ref.parameters() if p.is_floating_point()), torch.float32)
        reduction = max((max(p.shape) for p in ref.parameters() if p.dim()), default=16)
        default_rtol = tolerance(dtype, reduction=reduction, steps=steps)
        types = {fqn: type(m).__name__ for fqn, m in ref.named_modules()}
        judge = Judge(atol, default_rtol if rtol is None else rtol, types)
    run = _Run(g, tp, ref, judge, *_split_inputs(example_inputs), loss_fn)
    found = None
    for step in range(steps):
        found = run.step(step)
        if found is not None:
            break
    result = None
    if judge is not None:
        result = VerifyResult(g.size, steps, found, judge.compared, judge.worst, judge.worst_at)
    return g.broadcast(result)


def _builder(model: ModelOrFactory) -> Callable[[], nn.Module]:
    if isinstance(model, nn.Module):
        return lambda: copy.deepcopy(model)
    if not callable(model):
        raise TypeError(
            f"verify: model must be an nn.Module or a zero-argument callable, got {type(model).__name__}"
        )

    def build() -> nn.Module:
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"verify: the model factory returned {type(built).__name__}, not an nn.Module"
            )
        return built

    return build


def _on_rank(
    model: ModelOrFactory,
    plan: Plan,
    example_inputs: Any,
    steps: int,
    atol: float | None,
    rtol: float | None,
    loss_fn: Any,
) -> VerifyResult:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return _verify_in_job(_builder(model), plan, example_inputs, mesh, steps, atol, rtol, loss_fn)


def verify(
    model: ModelOrFactory,
    plan: Plan,
    example_inputs: Any,
    *,
    mesh: DeviceMesh | None = None,
    tp_size: int = 2,
    steps: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> VerifyResult:
    """Compare a parallelized copy of ``model`` with the model on one device.

    Both copies start from the same weights, run in eval mode (no dropout masks to
    differ) on the same ``example_inputs``, and take ``steps`` SGD steps (lr 0.05,
    momentum 0.9) on the same scalar loss: ``loss_fn`` of the model's output (its first
    tensor), by default a fixed random weighting of every output element. Compared in
    execution order: every module's input and output, every gradient, every parameter
    after each step; the first difference beyond tolerance is the result.

    Args:
        model: an ``nn.Module`` (deep-copied, never modified) or a zero-argument callable
            returning one (called under ``torch.manual_seed(0)``).
        plan: the plan for :func:`~shardwise.parallelize_module`.
        example_inputs: the single-device inputs: a tensor, a tuple of positional
            arguments, or a dict of keyword arguments. Every rank gets all of them.

    Keyword Args:
        mesh: run inside the current distributed job on this 1-D TP mesh (call on every
            rank; every rank gets the result). Without it, ``verify`` starts ``tp_size``
            local gloo ranks itself, so ``model``, ``plan``, ``example_inputs`` and
            ``loss_fn`` must pickle (module-level functions and classes).
        steps: optimizer steps to run and compare.
        atol, rtol: a tensor matches when ``max|tp - ref| <= atol + rtol * max|ref|``.
            By default they come from the parameters' dtype: ``rtol = 2 eps sqrt(K)``
            with ``K`` the largest parameter dimension (the longest sum a layer makes),
            ``8 eps`` in half precision, and ``atol`` is ``rtol`` times a tenth (gradients)
            or a hundredth (the rest) of the largest magnitude among the tensors of the
            same phase, so a gradient that cancels to nearly zero is not held to its own
            tiny scale.

    Returns:
        :class:`VerifyResult`: ``ok``, ``first_divergence`` (``fqn``, ``phase``,
        ``max_abs_diff``, ``detail``), and ``str()`` in plain words.

    Example::

        >>> result = verify(lambda: MLP(16), {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()},
        ...                 torch.randn(4, 16), tp_size=2, steps=2)
        >>> print(result)
        TP=2 matches one device over 2 step(s): ...
    """
    if steps < 1:
        raise ValueError(f"verify: steps must be at least 1, got {steps}")
    if mesh is not None:
        return _verify_in_job(
            _builder(model), plan, example_inputs, mesh, steps, atol, rtol, loss_fn
        )
    if tp_size < 2:
        raise ValueError(
            f"verify: tp_size must be at least 2 to compare against one device, got {tp_size}"
        )
    payload = (model, plan, example_inputs, steps, atol, rtol, loss_fn)
    try:
        pickle.dumps(payload)
    except Exception as exc:
        raise TypeError(
            f"verify without a mesh sends model, plan, inputs and loss_fn to {tp_size} new "
            f"processes, so they must pickle ({exc}). Pass module-level functions or classes "
            "instead of lambdas, or call verify(..., mesh=mesh) inside your own job."
        ) from exc
    from ..testing.pool import RankPool

    with RankPool(tp_size) as pool:
        result: VerifyResult = pool.run(_on_rank, *payload, timeout=600.0)[0]
    return result
