"""``shardwise.explain`` against real runs: the dry run's numbers are the real run's numbers.

Real runs are 2 gloo ranks of this module's own pool; explain runs in this test process, which
has no process group, or inside a 2-rank job at another TP size. Collective counts of the
real runs come from torch's CommDebugMode, bytes from the c10d ops' own tensors, and a
hand count checks both.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d as c10d
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import ColwiseParallel, explain, parallelize_module
from shardwise._engine.sized_gather import _HEADER as SIZED_GATHER_HEADER
from shardwise.cli import main
from shardwise.diagnostics.dryrun import CollectiveLog, saved_activation_bytes
from shardwise.testing import RankPool, mesh_of
from shardwise.testing.comms import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, comm_counts
from shardwise.testing.models import GPTStack, gpt_block_plan

SEQ, BATCH, DIM, HEADS, DEPTH = 16, 2, 32, 4, 2
KIND = {ALL_REDUCE: "all_reduce", ALL_GATHER: "all_gather", REDUCE_SCATTER: "reduce_scatter"}


@pytest.fixture(scope="module")
def pool():
    """This module's own 2 gloo ranks: the dry runs inside them touch no shared worker."""
    with RankPool(2) as ranks:
        yield ranks


def _stack() -> GPTStack:
    torch.manual_seed(0)
    return GPTStack(DIM, HEADS, DEPTH)


def _input(world: int, sp: bool) -> torch.Tensor:
    return torch.randn(SEQ // world if sp else SEQ, BATCH, DIM, requires_grad=True)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _measure(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], group: Any) -> dict:
    """One real forward and backward: collectives (two ways), saved bytes, local shards."""
    params = list(model.parameters())
    fixed = [_local(p) for p in params] + list(model.buffers())
    # A step first, unmeasured: explain reports a step in steady state, after one-time
    # set-up (on gloo, a sequence-parallel gather's first capacity agreement).
    warm = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    out = model(*warm, **kwargs)
    (out.logits if hasattr(out, "logits") else out).sum().backward()
    model.zero_grad(set_to_none=True)
    del warm, out
    with CommDebugMode() as cf, CollectiveLog(group) as lf, saved_activation_bytes(fixed) as saved:
        out = model(*args, **kwargs)
    out = out.logits if hasattr(out, "logits") else out
    with CommDebugMode() as cb, CollectiveLog(group) as lb:
        out.sum().backward()
    return {
        "counts": {"forward": comm_counts(cf), "backward": comm_counts(cb)},
        "collectives": {"forward": lf.summary(), "backward": lb.summary()},
        "activations": saved["bytes"],
        "params": sum(_local(p).numel() for p in params),
        "param_bytes": sum(_local(p).numel() * _local(p).element_size() for p in params),
    }


def _real_stack(world: int, sp: bool) -> dict:
    mesh = mesh_of(world)
    model = parallelize_module(_stack(), mesh, {"blocks.*": gpt_block_plan(sp)})
    return _measure(model, (_input(world, sp),), {}, mesh.get_group())


def _check_against(report: Any, runs: list[dict]) -> None:
    d = report.to_dict()
    for run in runs:  # every rank sends the same
        assert d["collectives"] == run["collectives"]
        for phase, counts in run["counts"].items():
            assert {KIND[k]: n for k, n in counts.items()} == {
                k: v["count"] for k, v in d["collectives"][phase].items() if v["count"]
            }
    assert d["params_per_rank"] == runs[0]["params"]  # rank 0 holds the most
    assert d["memory_per_rank"]["parameters"] == runs[0]["param_bytes"]
    assert d["memory_per_rank"]["activations"] == runs[0]["activations"]


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_explain_equals_a_real_tp2_run(pool, sp):
    runs = pool.run(_real_stack, 2, sp)
    if sp:
        # On gloo each forward sequence gather also carries every rank's shape, a fixed
        # header per rank (shardwise's sized gather, so uneven splits never abort a
        # process); explain reports the payload, which is what NCCL sends.
        for run in runs:
            gather = run["collectives"]["forward"]["all_gather"]
            gather["bytes"] -= gather["count"] * 2 * SIZED_GATHER_HEADER
    report = explain(_stack(), {"blocks.*": gpt_block_plan(sp)}, tp_size=2, example_inputs=_input(2, sp))
    _check_against(report, runs)
    assert not dist.is_initialized()  # explain's own fake group is gone again
    # By hand: a [S, B, C] fp32 activation per collective (a sequence half with SP, where
    # gathers count their output and reduce-scatters their input: the full sequence).
    act = SEQ * BATCH * DIM * 4
    c = report.collectives
    if not sp:
        assert c["forward"]["all_reduce"] == {"count": 2 * DEPTH, "bytes": 2 * DEPTH * act}
        assert c["backward"]["all_reduce"] == {"count": 2 * DEPTH, "bytes": 2 * DEPTH * act}
    else:
        for phase in ("forward", "backward"):
            assert c[phase]["reduce_scatter"] == {"count": 2 * DEPTH, "bytes": 2 * DEPTH * act}
        assert c["forward"]["all_gather"] == {"count": 2 * DEPTH, "bytes": 2 * DEPTH * act}
        # Backward mirrors forward's reduce-scatters with all-gathers, and all-gathers each
        # saved sequence shard once more for the weight gradients (q/k/v share theirs).
        assert c["backward"]["all_gather"] == {"count": 4 * DEPTH, "bytes": 4 * DEPTH * act}
        # The LayerNorm weight and bias gradients: 2 norms x 2 parameters x DIM floats a block.
        assert c["backward"]["all_reduce"] == {"count": 4 * DEPTH, "bytes": 4 * DEPTH * DIM * 4}
        assert c["forward"]["all_reduce"]["count"] == 0


def _real_gloo_steps(world: int) -> list[dict]:
    """Two real sequence-parallel steps on a group never used before (nothing agreed yet)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(list(range(world)))
    model = parallelize_module(_stack(), DeviceMesh.from_group(group, "cpu"), {"blocks.*": gpt_block_plan(True)})
    steps = []
    for _ in range(2):
        with CollectiveLog(group) as fwd:
            out = model(_input(world, True))
        with CollectiveLog(group) as bwd:
            out.sum().backward()
        model.zero_grad(set_to_none=True)
        steps.append({"forward": fwd.summary(), "backward": bwd.summary()})
    dist.destroy_process_group(group)
    return steps


def test_explain_on_gloo_reports_the_first_step_and_the_steady_state(pool):
    # A real gloo step: sequence gathers carry each rank's shape, and the first one on a
    # group agrees on a padded capacity with one more (header-only) all-gather.
    first, steady = pool.run(_real_gloo_steps, 2)[0]
    assert first != steady
    report = explain(
        _stack(), {"blocks.*": gpt_block_plan(True)}, tp_size=2, example_inputs=_input(2, True),
        backend="gloo",
    )
    assert report.first_step_collectives == first
    assert report.collectives == steady
    gathers = report.collectives["forward"]["all_gather"]
    assert gathers["bytes"] == gathers["count"] * 2 * (SIZED_GATHER_HEADER + SEQ // 2 * BATCH * DIM * 4)
    assert "collectives of the first step" in str(report)
    # NCCL sends payloads only, every step alike.
    nccl = explain(_stack(), {"blocks.*": gpt_block_plan(True)}, tp_size=2, example_inputs=_input(2, True))
    assert nccl.first_step_collectives is None and nccl.to_dict()["backend"] == "nccl"


def _llama(**overrides: Any) -> nn.Module:
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
        max_position_embeddings=64, attn_implementation="sdpa",
    )
    return T.LlamaForCausalLM(T.LlamaConfig(**(config | overrides)))


def _llama_plan(model: nn.Module, tp: int) -> dict:
    from shardwise.hf import auto_plan

    return auto_plan(model, tp_size=tp, vocab_parallel=True)


def _real_llama(world: int) -> dict:
    mesh = mesh_of(world)
    model = _llama()
    model = parallelize_module(model, mesh, _llama_plan(model, world))
    ids = torch.randint(0, 96, (BATCH, SEQ))
    return _measure(model, (), {"input_ids": ids}, mesh.get_group())


def test_explain_equals_a_real_run_of_a_hf_llama(pool):
    pytest.importorskip("transformers")
    runs = pool.run(_real_llama, 2)
    model = _llama()
    report = explain(model, _llama_plan(model, 2), tp_size=2, batch_size=BATCH, seq_len=SEQ)
    _check_against(report, runs)
    assert report.params_total == sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in model.parameters())


def _explain_inside_a_job(tp: int) -> dict:
    groups = len(c10d._world.pg_map)
    with CollectiveLog(None) as everything:
        if dist.get_rank() == 0:  # rank 1 does not join: a collective on the job would hang
            report = explain(_stack(), {"blocks.*": gpt_block_plan()}, tp_size=tp,
                             example_inputs=_input(1, False))
    names = {c10d._world.pg_names[g] for g in c10d._world.pg_map}
    t = torch.ones(1)
    dist.all_reduce(t)  # the job's group still works
    out = {"groups": (groups, len(c10d._world.pg_map)), "sum": t.item(), "names": names}
    if dist.get_rank() == 0:
        out["fake"] = len(everything.events)
        out["per_rank"] = report.params_per_rank
    return out


def test_explain_at_another_tp_size_inside_a_job_communicates_nothing(pool):
    rank0, rank1 = pool.run(_explain_inside_a_job, 4)
    assert rank0["groups"][0] == rank0["groups"][1] and rank0["sum"] == 2.0
    assert not any("dry_run" in n for n in rank0["names"])
    # Collectives ran, on the fake group of 4 only: the log above saw every group.
    assert rank0["fake"] > 0
    alone = explain(_stack(), {"blocks.*": gpt_block_plan()}, tp_size=4, example_inputs=_input(1, False))
    assert rank0["per_rank"] == alone.params_per_rank  # a TP-4 shard, not the job's TP-2 one


def test_warns_by_name_about_a_large_unplanned_linear():
    plan = {f"blocks.*.{n}": s for n, s in gpt_block_plan().items() if n not in ("up", "down")}
    report = explain(_stack(), plan, tp_size=4, example_inputs=_input(1, False))
    up = [w for w in report.warnings if w.startswith("blocks.*.up.weight")]
    assert len(up) == 1 and "Linear that is not in the plan (32 -> 128)" in up[0]
    full = explain(_stack(), {"blocks.*": gpt_block_plan()}, tp_size=4, example_inputs=_input(1, False))
    assert full.warnings == []


def test_warns_about_uneven_shards_and_replicated_kv_heads():
    pytest.importorskip("transformers")
    model = _llama(intermediate_size=100, num_attention_heads=8)
    report = explain(model, _llama_plan(model, 8), tp_size=8, seq_len=8)
    text = "\n".join(report.warnings)
    assert "KV heads replicated in model.layers.*.self_attn: 2 key/value heads over 8 ranks" in text
    assert "uneven shards: model.layers.*.mlp.up_proj.weight splits dim 0 (100) over 8 ranks" in text
    assert "13, 13, ..., 9" in text  # torch.chunk pieces


def _real_errors(plans: list[Any]) -> list[tuple[str, str]]:
    out = []
    for plan in plans:
        try:
            parallelize_module(_stack(), mesh_of(2), plan)
        except Exception as exc:  # noqa: BLE001 - compared below
            out.append((type(exc).__name__, str(exc)))
    return out


def _bad_plans() -> list[Any]:
    return [
        {"blocks.*.nope": ColwiseParallel()},
        {"blocks.0.ln1": ColwiseParallel()},
        {"blocks.0": {"q": "colwise"}},
    ]


def test_a_bad_plan_raises_what_parallelize_module_raises(pool):
    real = pool.run(_real_errors, _bad_plans())[0]
    assert len(real) == 3
    for plan, (kind, message) in zip(_bad_plans(), real):
        with pytest.raises(Exception) as caught:
            explain(_stack(), plan, tp_size=2, example_inputs=_input(1, False))
        assert (type(caught.value).__name__, str(caught.value)) == (kind, message)
    assert not dist.is_initialized()


def tiny_factory() -> tuple[nn.Module, dict, torch.Tensor]:
    """A ``module:function`` target for the command."""
    return _stack(), {"blocks.*": gpt_block_plan()}, _input(1, False)


def test_command_json_is_the_report(capsys):
    assert main(["explain", f"{__name__}:tiny_factory", "--tp", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, plan, inputs = tiny_factory()
    assert printed == explain(model, plan, tp_size=2, example_inputs=inputs).to_dict()
    assert main(["explain", f"{__name__}:tiny_factory", "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "blocks.*.q" in text and "all_reduce" in text and "warnings: none" in text


def test_command_reads_a_config_json_and_explains_itself(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = _llama()
    model.config.save_pretrained(tmp_path)
    assert main(["explain", str(tmp_path / "config.json"), "--tp", "2", "--seq", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params_total"] == sum(p.numel() for p in model.parameters())
    assert d["inputs"] == {"input_ids": {"shape": [1, 8], "dtype": "int64"}}
    with pytest.raises(SystemExit) as done:
        main(["explain", "--help"])
    assert done.value.code == 0 and "package.module:function" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a Hugging Face directory"):
        main(["explain", str(tmp_path / "missing"), "--tp", "2"])


def test_command_on_a_llama_3_70b_config(tmp_path, capsys):
    """The Llama-3-70B shape on the meta device at TP 8, seq 4096: exact size, sharded ~1/8."""
    pytest.importorskip("transformers")
    import transformers as T

    h, layers, inter, vocab, kv = 8192, 80, 28672, 128256, 1024
    T.LlamaConfig(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=8192,
    ).save_pretrained(tmp_path)
    assert main(["explain", str(tmp_path), "--tp", "8", "--seq", "4096", "--dtype", "bfloat16",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    norms = (2 * layers + 1) * h
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    total = layers * per_layer + 2 * vocab * h + norms
    assert d["params_total"] == total == 70_553_706_496
    fully_sharded = (total - norms) / 8 + norms
    assert abs(d["params_per_rank"] / fully_sharded - 1) < 0.03
    assert d["memory_per_rank"]["parameters"] == 2 * d["params_per_rank"]  # bf16
    assert d["memory_per_rank"]["optimizer_states"] == 2 * d["memory_per_rank"]["gradients"]
    # Per layer one all-reduce after attention and one after the MLP, plus the embedding's.
    fwd = d["collectives"]["forward"]["all_reduce"]
    assert fwd == {"count": 2 * layers + 1, "bytes": (2 * layers + 1) * 4096 * h * 2}
