"""Checkpoint faults: hostile files run no code, corrupt files are caught, a checkpoint only
some ranks can see raises everywhere, and a save interrupted between its renames loads.

Every case asserts the exact outcome on every rank of a 2-rank pool: the right values, or
the same error, naming the file (or tensor, or rank), on both ranks, and a process group
that still works afterwards. ``pool.run``'s timeout turns a hang into a failure.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from models import MLP
from shardwise import PairwiseParallel, parallelize_module
from shardwise import checkpoint as ckpt
from shardwise.checkpoint import (
    load_checkpoint,
    load_full_state_dict,
    save_checkpoint,
    save_full_state_dict,
)
from shardwise.checkpoint.integrity import MANIFEST, digest_files, read_manifest, write_manifest
from shardwise.checkpoint.safe_dcp import read_metadata
from shardwise.testing import expect_raises, full, mesh_of

HANG = 120.0  # seconds: a body this slow is a hang (each takes a few seconds)


class Planted:
    """Unpickling this calls ``os.makedirs(path, 0o777, True)``: a visible side effect."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (self.path, 0o777, True))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return parallelize_module(MLP(), mesh_of(dist.get_world_size()), PairwiseParallel())


def _probe(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return full(model(x)).clone()


def _on_rank0(fn, *args) -> None:  # type: ignore[no-untyped-def]
    if dist.get_rank() == 0:
        fn(*args)
    dist.barrier()


def _copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


def _resign(directory: Path) -> None:
    """Rewrite the checksum manifest to match the files now there (what a forger does)."""
    manifest, _ = read_manifest(directory)
    assert manifest is not None
    files = digest_files(directory, manifest["files"])
    write_manifest(directory, files, world_size=manifest["world_size"], rng=manifest["rng"])


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _data_start(blob: bytes) -> int:
    """Offset of the first tensor's raw bytes inside a ``torch.save`` zip archive."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    header = info.header_offset
    name_len = int.from_bytes(blob[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(blob[header + 28 : header + 30], "little")
    return header + 30 + name_len + extra_len


def _shard_offset(directory: Path, fqn: str, file: str) -> int:
    """Offset, in ``file``, of the raw bytes of the chunk of ``fqn`` that ``file`` holds."""
    storage = read_metadata(directory / ".metadata").storage_data
    index, info = next(
        (i, s) for i, s in storage.items() if i.fqn == fqn and s.relative_path == file
    )
    blob = (directory / file).read_bytes()[info.offset : info.offset + info.length]
    return info.offset + _data_start(blob)


def _pg_works() -> bool:
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == dist.get_world_size()


# -- (1) hostile files run no code ------------------------------------------------------


def _hostile(directory: str) -> dict:
    root = Path(directory)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    full(model(torch.randn(4, 16))).sum().backward()
    opt.step()
    good = root / "good"
    save_checkpoint(good, model, opt, extra={"step": 1})
    before = _probe(model)
    markers = {
        k: str(root / f"ran-{k}") for k in ("meta", "lr", "extra", "pt", "save-extra", "control")
    }
    # An ``extra`` that would not load weights-only is refused when saving, not later.
    save_error = expect_raises(
        RuntimeError,
        save_checkpoint,
        root / "bad-extra",
        model,
        extra={"x": Planted(markers["save-extra"])},
    )

    # .metadata replaced by a planted pickle; the manifest re-signed to match.
    meta = root / "meta"
    _on_rank0(_copy, good, meta)
    _on_rank0(_write, meta / ".metadata", pickle.dumps(Planted(markers["meta"])))
    unsigned = root / "meta-unsigned"
    _on_rank0(_copy, meta, unsigned)
    _on_rank0(_resign, meta)
    # A metadata file of DCP's own classes whose storage points outside the directory.
    escape = root / "escape"
    _on_rank0(_copy, good, escape)
    md = read_metadata(good / ".metadata")
    for info in md.storage_data.values():
        info.relative_path = "../good/" + info.relative_path
    _on_rank0(_write, escape / ".metadata", pickle.dumps(md))
    _on_rank0(_resign, escape)
    # extra.pt replaced by a planted pickle (torch.save format), re-signed.
    extra = root / "extra"
    _on_rank0(_copy, good, extra)
    if dist.get_rank() == 0:
        torch.save({"step": Planted(markers["extra"])}, extra / "extra.pt")
    _on_rank0(_resign, extra)
    # A non-tensor optimizer entry (lr) that unpickles to a call: written by DCP itself.
    lr = root / "lr"
    opt.param_groups[0]["lr"] = Planted(markers["lr"])
    save_checkpoint(lr, model, opt)
    opt.param_groups[0]["lr"] = 0.05
    # A full state dict file holding a planted object.
    pt = root / "model.pt"
    if dist.get_rank() == 0:
        torch.save({"net1.weight": Planted(markers["pt"])}, pt)
    dist.barrier()

    fresh = _model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
    untouched = _probe(fresh)
    errors = {
        "meta": expect_raises(RuntimeError, load_checkpoint, meta, fresh, fresh_opt),
        "unsigned": expect_raises(RuntimeError, load_checkpoint, unsigned, fresh, fresh_opt),
        "escape": expect_raises(RuntimeError, load_checkpoint, escape, fresh, fresh_opt),
        "extra": expect_raises(RuntimeError, load_checkpoint, extra, fresh, fresh_opt),
        "lr": expect_raises(RuntimeError, load_checkpoint, lr, fresh, fresh_opt),
        "pt": expect_raises(RuntimeError, load_full_state_dict, fresh, pt),
    }
    unchanged = torch.equal(_probe(fresh), untouched) and fresh_opt.param_groups[0]["lr"] == 0.05
    # The second line of defence: with the up-front check skipped, DCP's own read of the
    # entry (through shardwise's planner) refuses it too.
    with mock.patch("shardwise.checkpoint.safe_dcp.check_entries"):
        errors["lr, during the read"] = expect_raises(
            RuntimeError, load_checkpoint, lr, fresh, fresh_opt
        )
    ran = {k: os.path.exists(v) for k, v in markers.items() if k != "control"}
    bad_extra_gone = not any("bad-extra" in name for name in os.listdir(root))
    pg_ok = _pg_works()

    # Control: stock DCP does run the planted lr (so the refusal above is what stopped it).
    from torch.distributed.checkpoint import load as dcp_load

    opt.param_groups[0]["lr"] = Planted(markers["control"])
    save_checkpoint(root / "control", model, opt)
    opt.param_groups[0]["lr"] = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_load(ckpt.sharded._dcp_state(fresh, fresh_opt), checkpoint_id=root / "control")
    control_ran = os.path.exists(markers["control"])

    load_checkpoint(good, fresh, fresh_opt)  # and a good checkpoint still loads
    errors["save extra"] = save_error
    return {
        "errors": errors,
        "ran": ran,
        "control_ran": control_ran,
        "bad_extra_gone": bad_extra_gone,
        "unchanged": unchanged,
        "pg_ok": pg_ok,
        "good_loads": torch.equal(_probe(fresh), before),
    }


def test_hostile_files_run_no_code(pools, tmp_path):
    ranks = pools(2).run(_hostile, str(tmp_path), timeout=HANG)
    expected = {
        "meta": r"refusing to read '.*meta/\.metadata': it refers to 'os\.makedirs'",
        "unsigned": r"'\.metadata' is \d+ bytes, the manifest says \d+ \(truncated or replaced\)",
        "escape": r"refusing to read .*: it points at '\.\./good/__0_0\.distcp', not a file of",
        "extra": r"refusing '.*extra/extra\.pt' \(extra\): it does not load with weights_only",
        "lr": r"refusing non-tensor entry 'optim\.param_groups\.0\.lr': it does not load with "
        r"weights_only=True \(.*GLOBAL os\.makedirs",
        "pt": r"refusing '.*model\.pt' \(a full state dict\): it does not load with weights_only",
        "save extra": r"refusing '.*bad-extra\.tmp/extra\.pt' \(extra\): it does not load with "
        r"weights_only=True",
        "lr, during the read": r"failed on rank 0: RuntimeError: refusing non-tensor entry "
        r"'optim\.param_groups\.0\.lr'.*; rank 1: RuntimeError: refusing non-tensor entry",
    }
    for rank, got in enumerate(ranks):
        for case, pattern in expected.items():
            assert re.search(pattern, got["errors"][case]), (rank, case, got["errors"][case])
        assert not any(got["ran"].values()), (rank, got["ran"])
        assert got["bad_extra_gone"], rank
        assert got["control_ran"], "stock DCP did not run the planted lr: the probe is broken"
        assert got["unchanged"] and got["pg_ok"] and got["good_loads"], (rank, got)
    # The same error on both ranks (a failed save reports rank 0's error on the others).
    first, second = (dict(r["errors"]) for r in ranks)
    relayed = f"rank 0 failed to write the checkpoint: RuntimeError: {first.pop('save extra')}"
    assert second.pop("save extra") == relayed
    assert first == second


# -- (2) corruption is caught, naming the file ---------------------------------------------


def _corrupt(directory: str) -> dict:
    root = Path(directory)
    model = _model()
    before = _probe(model)
    good = root / "good"
    save_checkpoint(good, model, extra={"step": 1})
    save_full_state_dict(model, root / "model.pt")
    save_full_state_dict(model, root / "model.safetensors")

    cases = {}
    for name in ("distcp", "truncated", "metadata", "extra", "manifest"):
        cases[name] = root / name
        _on_rank0(_copy, good, cases[name])
    # One flipped byte inside rank 1's shard of net1.weight (tensor data, not zip framing).
    flip_at = _shard_offset(good, "model.net1.weight", "__1_0.distcp") + 3
    _on_rank0(_flip, cases["distcp"] / "__1_0.distcp", flip_at)
    _on_rank0(os.truncate, cases["truncated"] / "__0_0.distcp", 100)
    _on_rank0(_flip, cases["metadata"] / ".metadata", 200)
    _on_rank0(_flip, cases["extra"] / "extra.pt", (cases["extra"] / "extra.pt").stat().st_size - 30)
    _on_rank0(_flip, cases["manifest"] / MANIFEST, 40)
    pt, st = root / "bad.pt", root / "bad.safetensors"
    _on_rank0(shutil.copy, root / "model.pt", pt)
    _on_rank0(_flip, pt, _data_start((root / "model.pt").read_bytes()) + 3)
    _on_rank0(shutil.copy, root / "model.safetensors", st)
    _on_rank0(_flip, st, st.stat().st_size - 5)  # the last tensor's data

    fresh = _model(seed=1)
    untouched = _probe(fresh)
    errors = {
        name: expect_raises(RuntimeError, load_checkpoint, path, fresh)
        for name, path in cases.items()
    }
    errors["pt"] = expect_raises(RuntimeError, load_full_state_dict, fresh, pt)
    errors["safetensors"] = expect_raises(RuntimeError, load_full_state_dict, fresh, st)
    unchanged = torch.equal(_probe(fresh), untouched)
    pg_ok = _pg_works()

    # Controls: the flips change values that stock readers load without complaint.
    load_checkpoint(cases["distcp"], fresh, verify=False)
    distcp_silent = not torch.equal(_probe(fresh), before)
    stock_pt = torch.load(pt, weights_only=True)
    pt_silent = not torch.equal(
        stock_pt["net1.weight"], torch.load(root / "model.pt")["net1.weight"]
    )
    load_checkpoint(good, fresh)
    return {
        "errors": errors,
        "unchanged": unchanged,
        "pg_ok": pg_ok,
        "controls": [distcp_silent, pt_silent],
        "good_loads": torch.equal(_probe(fresh), before),
    }


def test_corrupt_files_raise_on_every_rank(pools, tmp_path):
    ranks = pools(2).run(_corrupt, str(tmp_path), timeout=HANG)
    expected = {
        "distcp": r"^load_checkpoint\('.*distcp'\) failed on 1 of 2 ranks, so on all: rank 1: "
        r"'__1_0\.distcp' fails its checksum \(bytes 0-\d+ differ from when it was written\): "
        r"the file is corrupt\.$",
        "truncated": r"'__0_0\.distcp' is 100 bytes, the manifest says \d+ \(truncated or replaced\)",
        "metadata": r"'\.metadata' fails its checksum",
        "extra": r"'extra\.pt' fails its checksum",
        "manifest": r"'checksums\.json' is corrupt",
        "pt": r"'.*bad\.pt': record '.*/data/0' fails its CRC-32 check: the file is corrupt",
        "safetensors": r"'.*bad\.safetensors': tensor '.*' fails its checksum: the file is corrupt",
    }
    for rank, got in enumerate(ranks):
        assert set(got["errors"]) == set(expected)
        for case, pattern in expected.items():
            assert re.search(pattern, got["errors"][case]), (rank, case, got["errors"][case])
        assert got["unchanged"] and got["pg_ok"] and got["good_loads"], (rank, got)
        assert got["controls"] == [True, True], (
            "a flip did not change the data: the probe is broken"
        )
    assert ranks[0]["errors"] == ranks[1]["errors"]


# -- (3) a checkpoint only some ranks can see ----------------------------------------------


def _partly_visible(directory: str) -> dict:
    root = Path(directory)
    rank = dist.get_rank()
    model = _model()
    before = _probe(model)
    good = root / "ckpt"
    save_checkpoint(good, model)
    partial, older = root / "partial", root / "older"
    _on_rank0(_copy, good, partial)
    _on_rank0(os.remove, partial / "__0_0.distcp")
    save_checkpoint(older, _model(seed=3))
    pt = root / "model.pt"
    save_full_state_dict(model, pt)

    fresh = _model(seed=1)
    untouched = _probe(fresh)
    load = load_checkpoint
    errors = {
        "absent": expect_raises(RuntimeError, load, good if rank == 0 else root / "nowhere", fresh),
        "missing file": expect_raises(RuntimeError, load, good if rank == 0 else partial, fresh),
        "different": expect_raises(RuntimeError, load, good if rank == 0 else older, fresh),
        "full file": expect_raises(
            RuntimeError, load_full_state_dict, fresh, pt if rank == 0 else root / "gone.pt"
        ),
    }
    unchanged = torch.equal(_probe(fresh), untouched)
    pg_ok = _pg_works()
    load_checkpoint(good, fresh)
    return {
        "errors": errors,
        "unchanged": unchanged,
        "pg_ok": pg_ok,
        "good_loads": torch.equal(_probe(fresh), before),
    }


def test_checkpoint_visible_to_some_ranks_raises_on_all(pools, tmp_path):
    ranks = pools(2).run(_partly_visible, str(tmp_path), timeout=HANG)
    expected = {
        "absent": r"failed on 1 of 2 ranks, so on all: rank 1: no checkpoint at '.*nowhere'",
        "missing file": r"failed on 1 of 2 ranks, so on all: rank 1: '__0_0\.distcp' is missing",
        "different": r"the ranks see different checkpoints: rank 0: '.*ckpt' \(manifest \w+\); "
        r"rank 1: '.*older' \(manifest \w+\)",
        "full file": r"^load_full_state_dict failed on 1 of 2 ranks, so on all: rank 1: no file at "
        r"'.*gone\.pt'\.$",
    }
    for rank, got in enumerate(ranks):
        for case, pattern in expected.items():
            assert re.search(pattern, got["errors"][case]), (rank, case, got["errors"][case])
        assert got["unchanged"] and got["pg_ok"] and got["good_loads"], (rank, got)


# -- (4) a save interrupted between its two renames -------------------------------------------


def _interrupted(directory: str) -> dict:
    root = Path(directory)
    old, new = _model(seed=0), _model(seed=1)
    path = root / "ckpt"
    save_checkpoint(path, old)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("injected crash between the renames")
        real_replace(src, dst)

    # A file system without an atomic exchange (NFS...), and a crash between the renames.
    with (
        mock.patch.object(ckpt.files, "exchange", return_value=False),
        mock.patch.object(ckpt.files.os, "replace", crash_on_second),
    ):
        error = expect_raises((RuntimeError, OSError), save_checkpoint, path, new)
    dist.barrier()
    files_after_crash = sorted(os.listdir(root))
    recovered = _model(seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, recovered)
    notes = [str(w.message) for w in caught if "loading the complete one" in str(w.message)]
    dist.barrier()

    save_checkpoint(path, new)  # a later save publishes and removes the surviving copy
    files_after_save = sorted(os.listdir(root))
    reloaded = _model(seed=2)
    load_checkpoint(path, reloaded)
    return {
        "error": error,
        "files_after_crash": files_after_crash,
        "notes": notes,
        "recovered": torch.equal(_probe(recovered), _probe(old)),
        "files_after_save": files_after_save,
        "reloaded": torch.equal(_probe(reloaded), _probe(new)),
    }


def test_crash_between_renames_loads_the_surviving_copy(pools, tmp_path):
    for rank, got in enumerate(pools(2).run(_interrupted, str(tmp_path), timeout=HANG)):
        assert "injected crash between the renames" in got["error"], got["error"]
        assert got["files_after_crash"] == [".ckpt.old"], rank
        assert len(got["notes"]) == 1 and ".ckpt.old'" in got["notes"][0], got["notes"]
        assert got["recovered"], rank
        assert got["files_after_save"] == ["ckpt"], rank
        assert got["reloaded"], rank


def test_publish_is_one_atomic_exchange(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("new")
    (b / "old").write_text("old")
    if not ckpt.files.exchange(a, b):
        pytest.skip("this file system has no atomic exchange (the two-rename path is tested above)")
    assert sorted(os.listdir(b)) == ["new"] and sorted(os.listdir(a)) == ["old"]
    with mock.patch.object(ckpt.files.os, "replace", side_effect=AssertionError("renamed")):
        ckpt.files.swap_in(a, b)  # the exchange alone replaces the directory
    assert sorted(os.listdir(tmp_path)) == ["b"] and sorted(os.listdir(b)) == ["old"]
