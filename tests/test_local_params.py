"""Local leaves of DTensor parameters: where gradients land when parameters change hands."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from shardwise import ColwiseParallel, RowwiseParallel, parallelize_module
from shardwise.testing import full, mesh_of
from shardwise.testing.tolerance import largest_magnitude, tolerance


def _check_style(world: int, colwise: bool) -> None:
    mesh = mesh_of(world)
    torch.manual_seed(0)
    ref = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    style = ColwiseParallel(output_layouts=Replicate()) if colwise else RowwiseParallel()
    lin = nn.Linear(8, 6)
    lin.load_state_dict(ref.state_dict())
    lin = parallelize_module(lin, mesh, style)
    xin = x if colwise else x.chunk(world, -1)[mesh.get_local_rank()]
    ref_grad = torch.ones(6, 3) @ x

    # The installed parameters: the gradient reaches param.grad as a DTensor.
    lin(xin).sum().backward()
    assert isinstance(lin.weight.grad, DTensor)
    torch.testing.assert_close(full(lin.weight.grad), ref_grad)
    # A frozen weight gets no gradient; the bias still trains.
    lin.weight.grad = lin.bias.grad = None
    lin.weight.requires_grad_(False)
    lin(xin).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None
    lin.weight.requires_grad_(True)
    # Without grad mode: the same values, nothing recorded.
    with torch.no_grad():
        y = lin(xin)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.linear(x, ref.weight, ref.bias))
    # A parameter assigned in place of the installed one is the one used and trained.
    placements = list(lin.weight.placements)
    new = nn.Parameter(distribute_tensor(ref.weight.detach() * 2, mesh, placements))
    lin.weight = new
    lin(xin).sum().backward()
    assert new.grad is not None
    torch.testing.assert_close(full(new.grad), ref_grad)
    with torch.no_grad():
        torch.testing.assert_close(lin(xin), F.linear(x, ref.weight * 2, ref.bias))


def _grads_follow_the_parameters(world: int) -> None:
    _check_style(world, colwise=True)
    _check_style(world, colwise=False)


@pytest.mark.parametrize("world", [1, 2])
def test_grads_follow_the_parameters(pools, world):
    pools(world).run(_grads_follow_the_parameters, world)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _pair(world: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = _MLP()
    tp = _MLP()
    tp.load_state_dict(ref.state_dict())
    tp = parallelize_module(tp, mesh_of(world), {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return ref, tp


def _assert_same_grads(ref: nn.Module, tp: nn.Module) -> None:
    for (name, p), q in zip(ref.named_parameters(), tp.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert isinstance(q.grad, DTensor), name
            torch.testing.assert_close(full(q.grad), p.grad, msg=name)


class _Boom(Exception):
    pass


def _raise(grad: torch.Tensor) -> None:
    raise _Boom()


def _raise_in_backward(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """A forward pre-hook: the backward pass raises when it reaches the module's input."""
    args[0].register_hook(_raise)


def _backward_passes(world: int) -> None:
    ref, tp = _pair(world)
    x = torch.randn(5, 8)

    # Two backward passes over one graph (retain_graph) accumulate.
    for model in (ref, tp):
        loss = model(x).pow(2).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_same_grads(ref, tp)

    # Micro-batches accumulate, and every gradient is there when backward() returns.
    for model in (ref, tp):
        model.zero_grad(set_to_none=True)
        for chunk in x.chunk(2):
            model(chunk).sum().backward()
    _assert_same_grads(ref, tp)

    # A pass that raises half-way leaves the gradients it got to, as PyTorch does ...
    for model in (ref, tp):
        model.zero_grad(set_to_none=True)
        handle = model.fc2.register_forward_pre_hook(_raise_in_backward)
        out = model(x)
        handle.remove()
        with pytest.raises(_Boom):
            out.sum().backward()
        assert model.fc2.weight.grad is not None and model.fc1.weight.grad is None
    _assert_same_grads(ref, tp)
    # ... and zero_grad() clears them: the next pass starts from nothing.
    for model in (ref, tp):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    _assert_same_grads(ref, tp)

    # A backward pass nested in another (reentrant activation checkpointing).
    for model in (ref, tp):
        model.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_(True)
        out = torch.utils.checkpoint.checkpoint(model, xin, use_reentrant=True)
        (out.pow(2).sum() + xin.sum()).backward()
    _assert_same_grads(ref, tp)


@pytest.mark.parametrize("world", [1, 2])
def test_gradients_of_every_backward_pass_reach_the_parameters(pools, world):
    pools(world).run(_backward_passes, world)


def _backward_on_threads(world: int) -> list[str]:
    """Backward passes running at once on several threads each hand over their own leaves."""
    import sys
    import threading

    plan = {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(6)}
    torch.manual_seed(0)
    ref = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    x = torch.randn(4, 8)
    ref(x).sum().backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    models = []
    for _ in range(3):
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
        model.load_state_dict(ref.state_dict())
        models.append(parallelize_module(model, mesh_of(world), plan))
    problems: list[str] = []
    # Rowwise adds its bias after the matmul (nn.Linear fuses it): reordered rounding only.
    tol = tolerance(torch.float32, reduction=8 * 4, steps=1)
    scale = largest_magnitude(want.values())

    def run(k: int, model: nn.Module) -> None:
        for it in range(60):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()  # with world 1 no collective: threads may interleave freely
            for name, p in model.named_parameters():
                if p.grad is None or (full(p.grad) - want[name]).abs().max() > tol * (1 + scale):
                    problems.append(f"thread {k}, pass {it}: '{name}' grad incomplete at return")
                    return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=run, args=(k, m)) for k, m in enumerate(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return problems


def test_backward_passes_on_other_threads_hand_over_their_own_leaves(pools):
    assert pools(1).run(_backward_on_threads, 1) == [[]]
