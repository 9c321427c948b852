"""step_on_local_shards: torch's SGD/Adam/AdamW on local shards, bit for bit torch's own step.

Each case builds the same parameters twice (DTensors sharded, replicated, unevenly
split, float64, on a second mesh, next to plain tensors, in two groups with different
options), gives both copies the same gradients for several steps under an LR
scheduler, and steps one copy with torch's own optimizer and the other with the local
step. Parameters and every state tensor must be ``torch.equal``, with the same kind
(DTensor or plain), placements, dtype and device.

torch cannot run its foreach or fused kernels over a list that mixes DTensors and plain
tensors, or DTensors on two meshes, so for those options the reference's groups are
split by kind and mesh (which changes no element's update); the local step takes the
mixed groups as they are. torch's fused SGD has no DTensor rule at all, so its
reference is torch's fused SGD on plain copies of each rank's local tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from shardwise.optim import step_on_local_shards
from shardwise.testing import mesh_of

STEPS = 4


def _tensor_lr(lr: float) -> torch.Tensor:
    return torch.tensor(lr)


# name -> (optimizer class, options). Each name runs with foreach left to torch's default
# and with foreach=True, except where a suffix fixes the implementation.
CASES: dict[str, tuple[type[torch.optim.Optimizer], Callable[[], dict[str, Any]]]] = {
    "sgd": (torch.optim.SGD, lambda: {"lr": 0.1}),
    "sgd_momentum_dampening_decay": (
        torch.optim.SGD, lambda: {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    ),
    "sgd_nesterov_maximize": (
        torch.optim.SGD,
        lambda: {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
    ),
    "sgd_tensor_lr": (torch.optim.SGD, lambda: {"lr": _tensor_lr(0.1), "momentum": 0.9}),
    "adam": (torch.optim.Adam, lambda: {"lr": 0.01}),
    "adam_decay_amsgrad": (torch.optim.Adam, lambda: {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    "adam_decoupled_decay": (
        torch.optim.Adam, lambda: {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}
    ),
    "adamw": (torch.optim.AdamW, lambda: {"lr": 0.01}),
    "adamw_all_options": (
        torch.optim.AdamW,
        lambda: {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1,
                 "amsgrad": True, "maximize": True},
    ),
}
# torch takes a tensor lr or tensor betas with foreach only when capturable, which needs
# an accelerator: these run with torch's default (its per-parameter loop for DTensors).
DEFAULT_ONLY: dict[str, tuple[type[torch.optim.Optimizer], Callable[[], dict[str, Any]]]] = {
    "adamw_tensor_lr": (torch.optim.AdamW, lambda: {"lr": _tensor_lr(0.01), "weight_decay": 0.1}),
    "adam_tensor_betas": (
        torch.optim.Adam, lambda: {"lr": 0.01, "betas": (torch.tensor(0.8), torch.tensor(0.95))}
    ),
}
FUSED: dict[str, tuple[type[torch.optim.Optimizer], Callable[[], dict[str, Any]]]] = {
    "adam_fused_amsgrad": (torch.optim.Adam, lambda: {"lr": 0.01, "amsgrad": True, "fused": True}),
    "adamw_fused_tensor_lr": (
        torch.optim.AdamW, lambda: {"lr": _tensor_lr(0.01), "maximize": True, "fused": True}
    ),
    "sgd_fused_nesterov": (
        torch.optim.SGD,
        lambda: {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "fused": True},
    ),
}


def _layouts(world: int) -> list[tuple[str, tuple[int, ...], torch.dtype, Any, Any]]:
    """(name, global shape, dtype, mesh, placements); mesh None for a plain tensor."""
    if world == 4:
        mesh = mesh_of(2, 2, names=("dp", "tp"))
        return [
            ("w_2d", (4, 6), torch.float32, mesh, [Shard(0), Shard(1)]),
            ("w_tp", (6, 3), torch.float32, mesh["tp"], [Shard(0)]),
            ("b_dp", (5,), torch.float32, mesh["dp"], [Replicate()]),
            ("plain_w", (4, 3), torch.float32, None, None),
            ("w_2d_mixed", (3, 4), torch.float64, mesh, [Replicate(), Shard(1)]),
            ("w_tp_uneven", (5, 2), torch.float32, mesh["tp"], [Shard(0)]),
            ("w_dp", (4, 2), torch.float32, mesh["dp"], [Shard(1)]),
            ("plain_b", (3,), torch.float32, None, None),
        ]
    mesh, other = mesh_of(world), mesh_of(world, names=("other",))
    return [
        ("w_shard0", (4 * world, 6), torch.float32, mesh, [Shard(0)]),
        ("b_replicate", (7,), torch.float32, mesh, [Replicate()]),
        ("w_float64", (2 * world, 2), torch.float64, mesh, [Shard(0)]),
        ("plain_w", (4, 3), torch.float32, None, None),
        ("w_shard1", (5, 3 * world), torch.float32, mesh, [Shard(1)]),
        ("w_uneven", (2 * world + 1, 3), torch.float32, mesh, [Shard(0)]),
        ("w_other_mesh", (2 * world, 4), torch.float32, other, [Shard(0)]),
        ("plain_b", (3,), torch.float32, None, None),
    ]


def _global(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    return torch.randn(shape, generator=gen, dtype=dtype)


def _place(t: torch.Tensor, mesh: Any, placements: Any, *, local: bool) -> torch.Tensor:
    if mesh is None:
        return t
    # Every rank holds the same global tensor, so each cuts its own shard (no collective).
    d = distribute_tensor(t, mesh, placements, src_data_rank=None)
    return d.to_local().clone() if local else d


def _params(world: int, *, local: bool) -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(_place(_global(n, s, dt, 0), m, pl, local=local))
        for n, s, dt, m, pl in _layouts(world)
    ]


def _groups(params: list[torch.nn.Parameter], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Two groups of four, the second with twice the lr and no weight decay."""
    lr = options.get("lr", 1e-3)
    second = {"lr": lr * 2 if not isinstance(lr, torch.Tensor) else torch.tensor(lr.item() * 2)}
    if "weight_decay" in options:
        second["weight_decay"] = 0.0
    return [{"params": params[:4]}, {"params": params[4:], **second}]


def _split(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split by kind and mesh, as torch's foreach and fused kernels need."""
    out = []
    for g in groups:
        keys: list[Any] = []
        for p in g["params"]:
            key = p.device_mesh if isinstance(p, DTensor) else None
            if key not in keys:
                keys.append(key)
        for key in keys:
            chosen = [p for p in g["params"] if (p.device_mesh if isinstance(p, DTensor) else None) == key]
            out.append({**g, "params": chosen})
    return out


def _grads(params: list[torch.nn.Parameter], world: int, step: int, *, local: bool, skip: bool) -> None:
    for p, (name, shape, dtype, mesh, placements) in zip(params, _layouts(world)):
        # Some parameters sit steps out (no gradient): torch skips them, and SGD then
        # meets a mix of parameters with and without a momentum buffer.
        sits_out = skip and ((step == 1 and name.startswith(("w_shard1", "plain_b", "w_dp")))
                             or (step < 2 and name in ("w_other_mesh", "w_tp_uneven")))
        p.grad = None if sits_out else _place(_global(name, shape, dtype, step + 1), mesh, placements, local=local)


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, DTensor):
        assert a.placements == b.placements and a.device_mesh == b.device_mesh, what
        assert a.shape == b.shape and a.stride() == b.stride(), what
        a, b = a.to_local(), b.to_local()
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: differs by {(a.double() - b.double()).abs().max().item():.3g}"


def _run_case(world: int, name: str, foreach: bool | None) -> int:
    table = {**CASES, **DEFAULT_ONLY, **FUSED}
    cls, options = table[name]
    fused = options().get("fused", False)
    reference_on_locals = cls is torch.optim.SGD and fused
    mine_params = _params(world, local=False)
    ref_params = _params(world, local=reference_on_locals)
    extra = {} if foreach is None else {"foreach": foreach}
    mine = step_on_local_shards(cls(_groups(mine_params, options()), **options(), **extra))
    ref_groups = _groups(ref_params, options())
    ref = cls(_split(ref_groups) if (foreach or fused) else ref_groups, **options(), **extra)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (mine, ref)]
    storage = [p._local_tensor.data_ptr() for p in mine_params if isinstance(p, DTensor)]
    for step in range(STEPS):
        # torch's fused SGD cannot take a group where some parameters have a momentum
        # buffer and others do not yet, so every parameter steps every time there.
        _grads(mine_params, world, step, local=False, skip=not fused)
        _grads(ref_params, world, step, local=reference_on_locals, skip=not fused)
        mine.step()
        ref.step()
        for s in scheds:
            s.step()
        mine.zero_grad()
        ref.zero_grad()
    # The same Parameter objects, updated in place.
    assert [p for g in mine.param_groups for p in g["params"]] == mine_params
    assert [p._local_tensor.data_ptr() for p in mine_params if isinstance(p, DTensor)] == storage
    compared = 0
    for (layout, *_), p, q in zip(_layouts(world), mine_params, ref_params):
        got = p.to_local() if reference_on_locals and isinstance(p, DTensor) else p
        _same(got.detach(), q.detach(), f"{name}: parameter {layout}")
        assert mine.state[p].keys() == ref.state[q].keys(), (layout, mine.state[p].keys())
        for key, value in ref.state[q].items():
            ours = mine.state[p][key]
            if reference_on_locals and isinstance(ours, DTensor):
                assert ours.placements == p.placements, (layout, key)
                ours = ours.to_local()
            _same(ours, value, f"{name}: {key} of {layout}")
            compared += 1
        compared += 1
    return compared


def _case_ids() -> list[Any]:
    runs = []
    for name in CASES:
        runs += [pytest.param(name, None, id=f"{name}-default"), pytest.param(name, True, id=f"{name}-foreach")]
    runs += [pytest.param(name, None, id=f"{name}-default") for name in DEFAULT_ONLY]
    runs += [pytest.param(name, None, id=name) for name in FUSED]
    return runs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(("name", "foreach"), _case_ids())
def test_bit_identical_to_torchs_step(pools, world, name, foreach):
    compared = pools(world).run(_run_case, world, name, foreach)
    assert all(c == compared[0] and c >= 8 for c in compared), compared


@pytest.mark.parametrize(("name", "foreach"), [("adamw_all_options", True), ("sgd_nesterov_maximize", None)])
def test_bit_identical_on_a_2d_mesh_and_its_submeshes(pools, name, foreach):
    compared = pools(4).run(_run_case, 4, name, foreach)
    assert all(c == compared[0] and c >= 8 for c in compared), compared


# -- the same local kernels, in the same order -----------------------------------------


def _local_kernel_calls(world: int, name: str, foreach: bool | None, install: bool) -> list[Any]:
    """Every kernel call on plain tensors during 3 steps: (op, shapes and dtypes, scalars).

    DebugMode sees an op on DTensors and then, inside DTensor's dispatch, the op it runs
    on the local tensors; only the latter are kept.
    """
    from torch.utils._debug_mode import DebugMode
    from torch.utils._pytree import tree_flatten

    cls, options = {**CASES, **FUSED}[name]
    mesh = mesh_of(world)
    # One mesh, DTensors only: the groups torch's own foreach and fused steps can take.
    layouts = [lay for lay in _layouts(world) if lay[3] is mesh]
    params = [torch.nn.Parameter(_place(_global(n, s, dt, 0), m, pl, local=False)) for n, s, dt, m, pl in layouts]
    opt = cls(params, **options(), **({} if foreach is None else {"foreach": foreach}))
    if install:
        step_on_local_shards(opt)
    calls = []
    for step in range(3):
        for p, (n, s, dt, m, pl) in zip(params, layouts):
            p.grad = _place(_global(n, s, dt, step + 1), m, pl, local=False)
        with DebugMode(store_original_args=True) as mode:
            opt.step()
        for call in mode.operators:
            if not hasattr(call, "op"):
                continue
            flat, _ = tree_flatten((call.args, call.kwargs))
            if not any(isinstance(a, DTensor) for a in flat):
                calls.append((str(call.op), [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a
                                             for a in flat]))
    return calls


def _same_kernel_calls(world: int, name: str, foreach: bool | None) -> int:
    torchs = _local_kernel_calls(world, name, foreach, install=False)
    mine = _local_kernel_calls(world, name, foreach, install=True)
    assert mine == torchs, next((a, b) for a, b in zip(torchs, mine) if a != b)
    return len(mine)


@pytest.mark.parametrize(
    ("name", "foreach"),
    [("adamw_all_options", True), ("adam_decay_amsgrad", None), ("adam_fused_amsgrad", None),
     ("sgd_nesterov_maximize", True), ("sgd_momentum_dampening_decay", None)],
)
def test_the_same_local_kernels_in_the_same_order(pools, name, foreach):
    """Why the results are bit-identical: torch's step on DTensors runs each op as the same
    op on the local tensors (a foreach op as one call on the whole list), with the same
    scalars; the local step makes exactly those calls."""
    counts = pools(2).run(_same_kernel_calls, 2, name, foreach)
    assert counts[0] == counts[1] > 0
