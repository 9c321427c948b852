"""Checkpoints: save at one tensor-parallel size, load at another; full state dicts; atomic writes.

Bodies run on the session rank pools. A world size cannot change inside a body, so a
resharding test saves from one pool into pytest's ``tmp_path`` and loads from another.
"""

from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.tensor.debug import CommDebugMode

from models import MLP, DeepMLP
from shardwise import PairwiseParallel, parallelize_module
from shardwise.checkpoint import (
    export_full_state_dict,
    load_checkpoint,
    load_full_state_dict,
    save_checkpoint,
    save_full_state_dict,
)
from shardwise.testing import RankPool, expect_raises, full, mesh_of
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance

# The widest layer (DeepMLP's 4 x 16) is the longest reduction; three AdamW/SGD steps.
TOL = tolerance(torch.float32, reduction=64, steps=3)


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert_close_at_scale(actual, expected, tol=TOL, scale=largest_magnitude([expected]), what=msg)


def _model(world: int | None, seed: int = 0, cls: type[torch.nn.Module] = MLP) -> torch.nn.Module:
    """``cls`` built from ``seed``, parallelized on ``world`` ranks (plain if ``world`` is None)."""
    torch.manual_seed(seed)
    model = cls()
    return model if world is None else parallelize_module(model, mesh_of(world), PairwiseParallel())


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + step))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        full(model(_batch(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _probe(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return full(model(_batch(99))).clone()


def _files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


# -- (1) sharded checkpoint: save at TP=4, load at TP=2, TP=1 and plain -----------------


def _train_and_save(world: int, path: str, kind: str) -> dict:
    model = _model(world, cls=DeepMLP)
    opt = _optimizer(kind, model)
    _train(model, opt, range(2))
    save_checkpoint(path, model, opt, extra={"step": 2, "note": "tp4"})
    before = _probe(model)
    _train(model, opt, range(2, 3))
    return {"before": before, "after": _probe(model), "files": _files(os.path.dirname(path))}


def _load_and_continue(world: int | None, path: str, kind: str) -> dict:
    model = _model(world, seed=1, cls=DeepMLP)  # different weights: the load must overwrite them
    opt = _optimizer(kind, model)
    params = [id(p) for p in model.parameters()]
    extra = load_checkpoint(path, model, opt)
    assert [id(p) for p in model.parameters()] == params, "load replaced Parameter objects"
    assert [id(p) for p in opt.param_groups[0]["params"]] == params
    before = _probe(model)
    _train(model, opt, range(2, 3))
    return {"extra": extra, "before": before, "after": _probe(model)}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_checkpoint_reshards_model_and_optimizer(pools, tmp_path, kind):
    path = str(tmp_path / "ckpt")
    saved = pools(4).run(_train_and_save, 4, path, kind)[0]
    assert saved["files"] == ["ckpt"]  # the staging directory is gone
    loads = {
        "tp2": pools(2).run(_load_and_continue, 2, path, kind),
        "tp1": pools(1).run(_load_and_continue, 1, path, kind),
        "plain, world of 1": pools(1).run(_load_and_continue, None, path, kind),
        "plain, no process group": [_load_and_continue(None, path, kind)],
    }
    for where, ranks in loads.items():
        for got in ranks:
            assert got["extra"] == {"step": 2, "note": "tp4"}, where
            _close(got["before"], saved["before"], where)
            # Equal after one more step only if momentum / exp_avg were resharded too.
            _close(got["after"], saved["after"], where)


# -- (2) full state dicts ------------------------------------------------------------


def _export_and_save(world: int, directory: str) -> dict:
    torch.manual_seed(0)
    ref = MLP()
    tp = parallelize_module(copy.deepcopy(ref), mesh_of(world), PairwiseParallel())
    _train(ref, _optimizer("adamw", ref), range(2))
    _train(tp, _optimizer("adamw", tp), range(2))
    exported = export_full_state_dict(tp)
    expected = ref.state_dict()
    assert list(exported) == list(expected)
    for name, value in expected.items():
        assert not hasattr(exported[name], "placements"), name
        _close(exported[name], value, name)
    save_full_state_dict(tp, os.path.join(directory, "model.pt"))
    save_full_state_dict(tp, os.path.join(directory, "model.safetensors"))
    return {"probe": _probe(ref), "files": _files(directory)}


def _load_full(world: int | None, path: str) -> torch.Tensor:
    model = _model(world, seed=1)
    params = [id(p) for p in model.parameters()]
    with CommDebugMode() as comms:
        load_full_state_dict(model, path)
    # Each rank slices locally; the only communication is the ranks' one agreement
    # (all_gather_object: two all-gathers) that every rank read the file cleanly.
    counts = {str(op): n for op, n in comms.get_comm_counts().items()}
    assert counts == ({"c10d.allgather_": 2} if dist.is_initialized() else {}), counts
    assert [id(p) for p in model.parameters()] == params, "load replaced Parameter objects"
    return _probe(model)


def test_full_state_dict_export_save_load(pools, tmp_path):
    saved = pools(2).run(_export_and_save, 2, str(tmp_path))[0]
    assert saved["files"] == ["model.pt", "model.safetensors"]
    for name in saved["files"]:
        path = str(tmp_path / name)
        for world in (4, 1):
            for probe in pools(world).run(_load_full, world, path):
                _close(
                    probe, saved["probe"], f"{name} at TP={world}"
                )
        # A plain model reads either file with stock PyTorch, no shardwise involved.
        state = (
            load_file(path)
            if name.endswith(".safetensors")
            else torch.load(path, weights_only=True)
        )
        plain = MLP()
        plain.load_state_dict(state)
        _close(_probe(plain), saved["probe"])


# -- (3) atomic writes ----------------------------------------------------------------


def _broken_write_data(original):
    def write_data(self, plan, planner):
        future = original(self, plan, planner)
        future.wait()  # this rank's shard files are on disk, then the "disk fails"
        if dist.get_rank() == 1:
            raise OSError("injected write failure")
        return future

    return write_data


def _failed_saves(world: int, directory: str) -> dict:
    old, new = _model(world, seed=0), _model(world, seed=1)
    path, fresh = os.path.join(directory, "ckpt"), os.path.join(directory, "never")
    save_checkpoint(path, old)
    patch = _broken_write_data(FileSystemWriter.write_data)
    with mock.patch.object(FileSystemWriter, "write_data", patch):
        errors = [
            expect_raises(Exception, save_checkpoint, path, new),
            expect_raises(Exception, save_checkpoint, fresh, new),
        ]
    dist.barrier()
    files_after_dcp = _files(directory)
    reloaded = _model(world, seed=2)
    load_checkpoint(path, reloaded)

    single = os.path.join(directory, "model.pt")
    tensors = os.path.join(directory, "model.safetensors")
    save_full_state_dict(old, single)
    save_full_state_dict(old, tensors)

    def half_written(obj, f, *args, **kwargs):  # torch.save / save_file stand-in
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("injected write failure")

    with (
        mock.patch("torch.save", half_written),
        mock.patch("shardwise.checkpoint.full.save_safetensors", half_written),
    ):
        errors += [
            expect_raises(Exception, save_full_state_dict, new, single),
            expect_raises(Exception, save_full_state_dict, new, tensors),
        ]
    dist.barrier()
    from_pt, from_st = _model(world, seed=2), _model(world, seed=2)
    load_full_state_dict(from_pt, single)
    load_full_state_dict(from_st, tensors)
    files = _files(directory)
    dist.barrier()  # rank 0 must not start the next save (its staging dir) before all listed

    save_checkpoint(path, new)  # a save that succeeds replaces the old checkpoint
    replaced = _model(world, seed=2)
    load_checkpoint(path, replaced)
    return {
        "errors": errors,
        "files_after_dcp": files_after_dcp,
        "files": files,
        "files_at_end": _files(directory),
        "old": _probe(old),
        "reloaded": [_probe(reloaded), _probe(from_pt), _probe(from_st)],
        "new": _probe(new),
        "replaced": _probe(replaced),
    }


def test_failed_writes_leave_old_checkpoint_intact(pools, tmp_path):
    for rank, got in enumerate(pools(2).run(_failed_saves, 2, str(tmp_path))):
        assert all("injected write failure" in e for e in got["errors"]), got["errors"]
        assert got["files_after_dcp"] == ["ckpt"], rank  # no staging dir, no "never"
        assert got["files"] == ["ckpt", "model.pt", "model.safetensors"], rank
        for probe in got["reloaded"]:
            _close(probe, got["old"])
        assert got["files_at_end"] == got["files"], rank  # the old one moved aside, then removed
        _close(got["replaced"], got["new"])


# -- (4) mismatches raise on every rank, naming the key --------------------------------


def _bad_loads(world: int, directory: str) -> list[str]:
    model = _model(world)
    good = export_full_state_dict(model)
    untouched = _probe(model)
    missing = {k: v for k, v in good.items() if k != "net1.bias"}
    wrong = {**good, "net2.weight": torch.zeros(16, 8)}
    extra = {**good, "net3.weight": torch.zeros(1)}
    load = load_full_state_dict
    messages = [
        expect_raises(RuntimeError, load, model, missing, match=r"missing keys \['net1.bias'\]"),
        expect_raises(RuntimeError, load, model, extra, match=r"unexpected keys \['net3.weight'\]"),
        expect_raises(
            RuntimeError, load, model, wrong,
            match=r"mismatch for 'net2.weight': the state dict has \(16, 8\), the model \(16, 32\)",
        ),
    ]  # fmt: skip
    torch.testing.assert_close(_probe(model), untouched)  # checked first: nothing was copied
    load_full_state_dict(model, extra, strict=False)

    path = os.path.join(directory, "ckpt")
    save_checkpoint(path, model)
    wider = parallelize_module(MLP(hidden=64), mesh_of(world), PairwiseParallel())
    deep = _model(world, cls=DeepMLP)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    messages += [
        expect_raises(
            RuntimeError, load_checkpoint, path, wider,
            match=r"mismatch for 'net1.weight': the checkpoint has \(32, 16\), the model \(64,",
        ),
        expect_raises(RuntimeError, load_checkpoint, path, deep, match=r"missing keys \['l0.bias'"),
        expect_raises(RuntimeError, load_checkpoint, path, model, sgd, match="no optimizer state"),
        expect_raises(FileNotFoundError, load_checkpoint, os.path.join(directory, "nope"), model),
    ]  # fmt: skip
    return messages


def test_mismatches_raise_naming_the_key_on_every_rank(pools, tmp_path):
    ranks = pools(2).run(_bad_loads, 2, str(tmp_path))
    assert len(ranks) == 2 and ranks[0] == ranks[1]


# -- (5) bit-exact resume: RNG streams travel with the checkpoint ------------------------


class DropMLP(torch.nn.Module):
    """Dropout in the sharded hidden units (TP stream) and on the replicated output
    (torch's default generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.drop = torch.nn.Dropout(0.3)
        self.down = torch.nn.Linear(64, 16)
        self.out_drop = torch.nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_drop(self.down(self.drop(torch.relu(self.up(x)))))


def _dropout_run(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = parallelize_module(DropMLP(), mesh_of(world), PairwiseParallel())
    assert hasattr(model.drop, "_shardwise_rng")  # the hidden dropout draws per TP rank
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _dropout_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = full(model(_batch(step))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _uninterrupted(world: int, path: str, stop: int, total: int) -> list[float]:
    model, opt = _dropout_run(world, seed=0)
    losses = _dropout_steps(model, opt, range(stop))
    save_checkpoint(path, model, opt, extra={"step": stop})
    return losses + _dropout_steps(model, opt, range(stop, total))


def _resumed(world: int, path: str, total: int) -> dict[str, list[float]]:
    out = {}
    for rng in (True, False):
        model, opt = _dropout_run(world, seed=123)  # other weights, other random state
        stop = load_checkpoint(path, model, opt, rng=rng)["step"]
        out[f"rng={rng}"] = _dropout_steps(model, opt, range(stop, total))
    return out


def test_resume_with_sharded_dropout_is_bit_exact(pools, tmp_path):
    path, stop, total = str(tmp_path / "ckpt"), 3, 6
    reference = pools(2).run(_uninterrupted, 2, path, stop, total)
    assert reference[0] == reference[1]  # the output is replicated
    with RankPool(2) as fresh:  # new processes: nothing survives but the checkpoint
        resumed = fresh.run(_resumed, 2, path, total)
    for got in resumed:
        assert got["rng=True"] == reference[0][stop:]  # bit-identical floats
        # Without the random state the masks differ, so the losses do: the check can fail.
        assert all(a != b for a, b in zip(got["rng=False"], reference[0][stop:]))
