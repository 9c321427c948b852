"""shardwise.verify: a correct plan matches over two steps; each plan bug is found where it is.

The bugs (tests/verify_cases.py) are silent at plan time: a softmax over the sharded
features between a column- and a row-parallel layer, a head size taken from the local
width, and a plain scalar applied to a sharded activation (its gradient misses the sum
over the TP group). verify must name the module and the phase of each.
"""

from __future__ import annotations

import copy

import pytest
import torch

import shardwise
import verify_cases as cases
from shardwise.testing import mesh_of
from shardwise.testing.tolerance import ROUNDINGS, tolerance


def _verify(name: str, steps: int, dtype: torch.dtype = torch.float32) -> shardwise.VerifyResult:
    model, plan, x = getattr(cases, name)()
    return shardwise.verify(model.to(dtype), plan, x.to(dtype), mesh=mesh_of(2), steps=steps)


def _both(
    pools, name: str, steps: int = 2, dtype: torch.dtype = torch.float32
) -> shardwise.VerifyResult:
    results = pools(2).run(_verify, name, steps, dtype)
    assert results[0] == results[1], "ranks returned different results"
    return results[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correct_plan_matches_over_two_steps(pools, dtype):
    result = _both(pools, "good", dtype=dtype)
    assert result.ok, str(result)
    assert result.first_divergence is None
    n_params = len(list(cases.Block().parameters()))
    # Everything was compared: 11 modules' inputs and outputs, every gradient, every parameter.
    assert result.compared["module inputs and outputs"] == 2 * 2 * 11
    assert result.compared["gradients"] == 2 * n_params
    assert result.compared["parameters after a step"] == 2 * n_params
    assert result.compared["output gradients"] > 0
    assert 0.0 < result.worst <= 1.0
    assert str(result).startswith("TP=2 matches one device over 2 step(s)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_over_sharded_features_is_found_at_the_row_layer_input(pools, dtype):
    found = _both(pools, "softmax_between", dtype=dtype).first_divergence
    assert found is not None
    assert (found.fqn, found.phase, found.what, found.step) == ("mlp.fc2", "forward", "input", 0)
    assert found.max_abs_diff > found.tolerance > 0
    assert "inputs of 'mlp.fc2' already differ" in found.detail
    assert "although 'mlp.fc1' matched: look at the code between them" in found.detail
    assert "in the forward of 'mlp' (MLP)" in found.detail
    assert "split along dim 2 (the ranks hold [64, 64] of 128)" in found.hint


def test_head_count_from_local_width_is_found_between_v_and_o(pools):
    result = _both(pools, "local_heads")
    found = result.first_divergence
    assert found is not None and not result.ok
    assert (found.fqn, found.phase, found.what) == ("attn.o", "forward", "input")
    assert "although 'attn.v' matched" in found.detail
    assert "in the forward of 'attn' (Attention)" in found.detail
    assert "head count taken from the local width" in found.hint
    text = str(result)
    assert text.startswith("TP=2 differs from one device at step 0, forward: inputs of 'attn.o'")


def test_plain_parameter_missing_its_gradient_sum_is_found_in_backward(pools):
    found = _both(pools, "plain_gate").first_divergence
    assert found is not None
    assert (found.fqn, found.phase, found.what) == ("mlp", "backward", "gradient")
    assert "the gradient of parameter 'mlp.gate'" in found.detail
    assert "although the gradient arriving at the output of 'mlp' matched" in found.detail
    assert "the ranks' gradients sum to the single-device one" in found.detail
    assert "needs a sum over the TP group" in found.hint
    # The scalar gate's true gradient is a sum over 128 features; each rank has half of it.
    assert found.max_abs_diff > 1.0


def test_one_tolerance_model_follows_the_dtype_and_the_computation():
    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    fp32, fp64, bf16 = (tolerance(d, reduction=256) for d in (torch.float32, torch.float64, torch.bfloat16))
    assert fp64 < fp32 < bf16
    assert fp32 == pytest.approx(eps32 * (256 + ROUNDINGS))
    # Half precision accumulates in float32: its own eps enters only through roundings.
    assert bf16 == pytest.approx(eps32 * 256 + ROUNDINGS * eps16)
    assert tolerance(torch.int64, reduction=256) == 0.0
    # Longer sums and more steps round more.
    assert tolerance(torch.float32, reduction=4096) > fp32
    assert tolerance(torch.float32, reduction=256, steps=3) == pytest.approx(3 * fp32)


def test_verify_and_the_test_kit_share_the_model():
    import shardwise.diagnostics.verify as verify_module
    import shardwise.testing.parity as parity_module
    from shardwise.diagnostics import tolerance as model

    assert verify_module.tolerance is model.tolerance is parity_module.tolerance


def test_verify_starts_its_own_ranks_and_leaves_the_model_alone():
    model, plan, x = cases.good()
    before = copy.deepcopy(model.state_dict())
    result = shardwise.verify(model, plan, x, tp_size=2, steps=1)
    assert result.ok, str(result)
    assert result.tp_size == 2 and result.steps == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"verify modified {name}"
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_verify_without_a_mesh_needs_picklable_arguments():
    _, plan, x = cases.good()
    with pytest.raises(TypeError, match="must pickle"):
        shardwise.verify(lambda: cases.Block(), plan, x, tp_size=2)
    with pytest.raises(ValueError, match="tp_size must be at least 2"):
        shardwise.verify(cases.Block(), plan, x, tp_size=1)


def test_replicated_gradients_that_differ_between_ranks_are_found(pools):
    # Each rank's gradient of the faint gate is within tolerance of one device's; the
    # ranks' gradients are not equal to each other: the copies would train apart.
    found = _both(pools, "faint_gate").first_divergence
    assert found is not None
    assert (found.fqn, found.phase, found.what) == ("mlp", "backward", "gradient")
    assert "replicated parameter 'mlp.gate'" in found.detail
    assert "on rank 1 than on rank 0" in found.detail
    assert "needs its gradient summed over the TP group" in found.hint
    assert found.max_abs_diff > found.tolerance > 0
