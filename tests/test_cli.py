"""The ``shardwise`` command: --help, ``verify`` exit codes, and ``train`` (loss falls, files written).

Subcommands run as ``python -m shardwise`` in a subprocess, as a user would run them;
each starts its own ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shardwise
from shardwise.cli import SUBCOMMANDS, main
from shardwise.cli.charlm import VOCAB, decode, encode, verify_case
from shardwise.cli.factory import build, load_factory
from shardwise.testing import mesh_of

CASES = Path(__file__).parent / "verify_cases.py"
SRC = Path(shardwise.__file__).resolve().parents[1]


def _shardwise(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "shardwise", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in top
    phrases = {
        "verify": [
            "package.module:function",
            "(model, plan, example_inputs)",
            "0 if they match, 1 if not",
        ],
        "train": [
            "--tp",
            "--steps",
            "--out",
            "metrics.jsonl",
            "standard library",
            "(default: 800)",
        ],
    }
    for name, wanted in phrases.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for phrase in wanted:
            assert phrase in text, f"`shardwise {name} --help` does not mention {phrase!r}"


def test_train_rejects_impossible_flags_before_starting_ranks(capsys):
    assert main(["train", "--tp", "2", "--heads", "3", "--hidden", "96"]) == 2
    assert "--heads 3 is not divisible by --tp 2" in capsys.readouterr().err
    assert main(["train", "--hidden", "100", "--heads", "8"]) == 2


def test_factories_load_by_module_or_file():
    assert load_factory("shardwise.cli.charlm:verify_case") is verify_case
    model, plan, inputs = build(f"{CASES}:good")
    assert type(model).__name__ == "Block" and "mlp.fc1" in plan and inputs.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_factory("no_colon_here")
    with pytest.raises(AttributeError, match="no function 'missing'"):
        load_factory("shardwise.cli.charlm:missing")


def test_charlm_vocabulary_round_trips():
    text = "def f(x):\n    return x  # ok"
    assert decode(encode(text)) == text
    assert len(VOCAB) == 96 and encode("é").numel() == 0


def _verify_train_plan() -> bool:
    model, plan, ids = verify_case()
    return shardwise.verify(model, plan, ids, mesh=mesh_of(2), steps=2).ok


def test_train_plan_matches_one_device(pools):
    assert pools(2).run(_verify_train_plan) == [True, True]


def test_verify_command_exits_0_on_a_good_plan_and_1_on_a_bad_one():
    good = _shardwise("verify", f"{CASES}:good", "--tp", "2")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "TP=2 matches one device over 2 step(s)" in good.stdout
    bad = _shardwise("verify", f"{CASES}:softmax_between", "--tp", "2")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "inputs of 'mlp.fc2' already differ" in bad.stdout
    assert "although 'mlp.fc1' matched" in bad.stdout
    missing = _shardwise("verify", f"{CASES}:nope", "--tp", "2")
    assert missing.returncode == 2 and "cannot load" in missing.stderr


def test_train_writes_metrics_and_plot_and_the_loss_falls(tmp_path):
    out = tmp_path / "run"
    # Smaller than the default model, so the test stays short; 60 steps as in the issue.
    done = _shardwise(
        "train",
        "--tp",
        "2",
        "--steps",
        "60",
        "--out",
        str(out),
        "--hidden",
        "64",
        "--seq",
        "64",
        "--batch",
        "8",
        "--sample",
        "40",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40, 50, 59]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert first == pytest.approx(4.56, abs=0.15)  # ln(96): uniform over the vocabulary
    assert last <= 0.85 * first, f"loss fell only from {first} to {last}"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TP=2 on 2 CPU processes" in done.stdout
    sample = done.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("def ") and len(sample) >= len("def ") + 40
