"""2-D parallelism: PairwiseParallel on the rows of a 2x2 mesh, FSDP1/FSDP2 on its columns.

Ranks ``[[0, 1], [2, 3]]`` named ``("dp", "tp")``. Each dp rank feeds its own half of a
global batch; the single-process reference sees the whole batch with a mean loss, so
FSDP's gradient average over dp reproduces the reference gradient.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models import MLP, DeepMLP
from shardwise import PairwiseParallel, enable_2d_with_fsdp, parallelize_module
from shardwise.fsdp import parallelize_2d
from shardwise.testing import mesh_of
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance

WORLD = 4
BATCH = 4  # rows per dp rank
BUILDERS = {"mlp": MLP, "deep": DeepMLP}
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _mesh2d():
    return mesh_of(2, 2, names=("dp", "tp"))


def _wrap(model: nn.Module, flavour: str) -> nn.Module:
    mesh = _mesh2d()
    if flavour == "fsdp1":
        assert enable_2d_with_fsdp()
        cpu = torch.device("cpu")
        wrapped = FSDP(model, device_mesh=mesh["dp"], use_orig_params=True, device_id=cpu)
        # Given a mesh sliced from a larger one, FSDP1 builds its own DTensor extension.
        assert wrapped._fsdp_extension is not None
        return wrapped
    if flavour == "fsdp2_blocks":  # per-layer units: reshard after forward, re-gather in backward
        for child in model.children():
            fully_shard(child, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _build_2d(kind: str, flavour: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """A reference model and its TP(rows) x FSDP(columns) copy, same initial weights."""
    torch.manual_seed(seed)
    ref = BUILDERS[kind]()
    model = parallelize_module(copy.deepcopy(ref), _mesh2d(), PairwiseParallel(), tp_mesh_dim=1)
    return ref, _wrap(model, flavour)


def _full_params(model: nn.Module, flavour: str) -> dict[str, torch.Tensor]:
    """Every parameter's global value, gathered the flavour's own way."""
    if flavour == "fsdp1":
        with FSDP.summon_full_params(model):
            return {n: _global(p) for n, p in model.named_parameters()}
    return {n: _global(p) for n, p in model.named_parameters()}


def _global(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (both dp halves), the same on every rank."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * BATCH, 16, generator=gen), torch.randn(2 * BATCH, 16, generator=gen)


def _longest(model: nn.Module, x: torch.Tensor) -> int:
    """The longest sum in a step: a weight's width or the batch a weight gradient sums over."""
    return max([x.shape[0], *(d for p in model.parameters() for d in p.shape)])


def _train_body(kind: str, flavour: str, opt_name: str, micro: int, steps: int = 3) -> dict:
    ref, model = _build_2d(kind, flavour, seed=0)
    opt_ref, opt = OPTIMIZERS[opt_name](ref.parameters()), OPTIMIZERS[opt_name](model.parameters())
    dp_rank = _mesh2d().get_local_rank("dp")
    losses = []
    for step in range(steps):
        x, target = _batch(step)
        # The reference loss is the mean over the global batch, written as the mean of
        # the 2 * micro equal pieces so that each rank can compare its own pieces.
        pieces = list(zip(x.chunk(2 * micro), target.chunk(2 * micro)))
        ref_losses = [F.mse_loss(ref(xp), yp) for xp, yp in pieces]
        torch.stack(ref_losses).mean().backward()
        for m in range(micro):  # gradient accumulation over this rank's micro-batches
            k = dp_rank * micro + m
            loss = F.mse_loss(model(pieces[k][0]), pieces[k][1])
            (loss / micro).backward()
            assert_close_at_scale(
                loss.detach(),
                ref_losses[k].detach(),
                tol=tolerance(torch.float32, reduction=_longest(ref, x), steps=step + 1),
                scale=0.0,
                what=f"step {step} loss",
            )
            losses.append(loss.item())
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        full = _full_params(model, flavour)
        assert set(full) == set(dict(ref.named_parameters())), sorted(full)
        for name, p_ref in ref.named_parameters():
            assert_close_at_scale(
                full[name],
                p_ref.detach(),
                tol=tolerance(torch.float32, reduction=_longest(ref, x), steps=step + 1),
                scale=largest_magnitude(ref.parameters()),
                what=f"step {step} param {name}",
            )
    return {"losses": losses, "params": len(full)}


TRAIN_CASES = [
    ("mlp", "fsdp1", "sgd", 1),
    ("deep", "fsdp1", "adam", 2),
    ("mlp", "fsdp2", "adam", 1),
    ("deep", "fsdp2", "sgd", 2),
    ("deep", "fsdp2_blocks", "adam", 1),
]


@pytest.mark.parametrize("kind,flavour,opt_name,micro", TRAIN_CASES)
def test_2d_trains_like_one_process(pools, kind, flavour, opt_name, micro):
    results = pools(WORLD).run(_train_body, kind, flavour, opt_name, micro)
    assert all(r["params"] == len(list(BUILDERS[kind]().parameters())) for r in results)
    assert len(results[0]["losses"]) == 3 * micro
    # The two ranks of a TP row see the same batch; the two dp rows see different ones.
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["losses"] != results[2]["losses"]


def _state_dict_body(kind: str, flavour: str) -> dict:
    ref, model = _build_2d(kind, flavour, seed=0)
    x, target = _batch(0)
    dp_rank = _mesh2d().get_local_rank("dp")
    F.mse_loss(model(x.chunk(2)[dp_rank]), target.chunk(2)[dp_rank]).backward()
    F.mse_loss(ref(x), target).backward()
    for m in (ref, model):  # trained weights, so that loading is not confused with the initial ones
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    sharded = get_model_state_dict(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    expected = {n: p.detach() for n, p in ref.named_parameters()}
    assert set(sharded) == set(full) == set(expected)
    for name, value in sharded.items():
        assert isinstance(value, DTensor), name
        assert value.device_mesh.mesh.tolist() == [[0, 1], [2, 3]], name
        torch.testing.assert_close(value.full_tensor(), expected[name], msg=f"sharded {name}")
        torch.testing.assert_close(full[name], expected[name], msg=f"full {name}")

    probe = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    want = ref(probe)
    ref.zero_grad()
    F.mse_loss(want, torch.zeros_like(want)).backward()
    want_grads = {n: p.grad for n, p in ref.named_parameters()}
    want = want.detach()
    loaded = {}
    for label, state, options in [
        ("sharded", sharded, None),
        ("full", full, StateDictOptions(full_state_dict=True)),
    ]:
        _, fresh = _build_2d(kind, flavour, seed=1)
        before = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True))
        first = next(iter(expected))
        assert not torch.allclose(before[first], expected[first]), "fresh == trained?"
        if label == "full" and flavour == "fsdp1":
            # torch 2.13 FSDP1 cannot load a *full* state dict into DTensor (TP) parameters
            # ("mixed torch.Tensor and DTensor" in copy_, also with torch's own TP), so the
            # full tensors are distributed like the fresh model's sharded entries first.
            state = _like_sharded(state, get_model_state_dict(fresh))
            options = None
        set_model_state_dict(fresh, copy.deepcopy(state), options=options or StateDictOptions())
        out = fresh(probe)
        torch.testing.assert_close(out, want, msg=f"{label} round trip")
        F.mse_loss(out, torch.zeros_like(want)).backward()  # ... and trains like the reference
        grads = _full_grads(fresh, flavour)
        assert set(grads) == set(want_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], msg=f"{label} grad {name}")
        loaded[label] = sorted(grads)
    return loaded


def _like_sharded(full: dict, template: dict) -> dict:
    return {k: distribute_tensor(full[k], v.device_mesh, v.placements) for k, v in template.items()}


def _full_grads(model: nn.Module, flavour: str) -> dict[str, torch.Tensor]:
    if flavour == "fsdp1":
        with FSDP.summon_full_params(model, with_grads=True):
            return {n: _global(p.grad) for n, p in model.named_parameters()}
    return {n: _global(p.grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour", ["fsdp1", "fsdp2"])
def test_state_dict_round_trip(pools, flavour):
    for loaded in pools(WORLD).run(_state_dict_body, "deep", flavour):
        assert loaded["sharded"] == loaded["full"] and len(loaded["full"]) == 8


def _mesh_dim_body() -> dict:
    mesh = _mesh2d()
    probe = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    seen = {}
    for dim in (0, 1, -1):
        torch.manual_seed(0)
        ref = MLP()
        model = parallelize_module(copy.deepcopy(ref), mesh, PairwiseParallel(), tp_mesh_dim=dim)
        for p in model.parameters():
            assert isinstance(p, DTensor) and p.device_mesh.ndim == 1
        seen[dim] = model.net1.weight.device_mesh.mesh.tolist()
        torch.testing.assert_close(model(probe), ref(probe), msg=f"tp_mesh_dim={dim}")
    for dp_dim, tp_dim in [("dp", "tp"), ("tp", "dp")]:
        torch.manual_seed(0)
        ref = MLP()
        model = parallelize_2d(
            copy.deepcopy(ref), mesh, PairwiseParallel(), dp_dim=dp_dim, tp_dim=tp_dim
        )
        weight = model.net1.weight
        assert weight.device_mesh.ndim == 2 and weight.placements[-1] == Shard(0), weight.placements
        assert weight.device_mesh.mesh_dim_names == (dp_dim, tp_dim)
        seen[f"2d-{tp_dim}"] = weight.device_mesh.mesh.tolist()
        torch.testing.assert_close(model(probe), ref(probe), msg=f"parallelize_2d tp_dim={tp_dim}")
        torch.testing.assert_close(weight.full_tensor(), ref.net1.weight.detach())
    for bad in [{"dp_dim": "x"}, {"tp_dim": "dp"}]:
        with pytest.raises(ValueError, match="dp_dim|tp_dim|dimension names"):
            parallelize_2d(MLP(), mesh, PairwiseParallel(), **bad)
    with pytest.raises(ValueError, match="dimension names"):
        parallelize_2d(MLP(), mesh["tp"], PairwiseParallel())
    return seen


def test_tp_mesh_dim_picks_rows_or_columns(pools):
    for rank, seen in enumerate(pools(WORLD).run(_mesh_dim_body)):
        row = [2 * (rank // 2), 2 * (rank // 2) + 1]
        column = [rank % 2, rank % 2 + 2]
        assert seen[1] == seen[-1] == row, (rank, seen)
        assert seen[0] == column, (rank, seen)
        assert seen["2d-tp"] == [[0, 1], [2, 3]]  # FSDP2 params live on the whole 2-D mesh
        assert seen["2d-dp"] == [[0, 2], [1, 3]]  # ... laid out (dp, tp), here TP on columns


def test_enable_2d_with_fsdp_checks_only():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert enable_2d_with_fsdp() is True
        assert enable_2d_with_fsdp() is True  # idempotent


def test_enable_2d_with_fsdp_warns_when_machinery_is_missing(monkeypatch):
    import torch.distributed.fsdp._fsdp_extensions as ext

    monkeypatch.delattr(ext, "FSDPExtensions")
    with pytest.warns(UserWarning, match="2D parallelism won't work with FSDP"):
        assert enable_2d_with_fsdp() is False
