"""step_on_local_shards in use: a parallelized model, checkpoints, schedulers and hooks, errors.

The case matrix (every option, against torch's step on the same tensors) is in
``test_optim_local_step.py``; here the step runs where users run it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from shardwise import foreach_param_groups, parallelize_module
from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.optim import step_on_local_shards
from shardwise.testing import check_parity, expect_raises, full, mesh_of
from shardwise.testing.comms import ALL_REDUCE, comm_counts
from shardwise.testing.models import GPTStack, gpt_block_plan
from shardwise.testing.tolerance import assert_close_at_scale, largest_magnitude, tolerance


def _gpt(world: int, *, sequence_parallel: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    plan = {"blocks.*": gpt_block_plan(sequence_parallel=sequence_parallel)}
    return parallelize_module(GPTStack(32, 4, 2), mesh_of(world), plan)


def _batch(step: int, world: int = 1, rank: int = 0, *, sequence_parallel: bool = False) -> torch.Tensor:
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(100 + step))
    return x.chunk(world, 0)[rank].clone() if sequence_parallel else x


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, **batch: Any) -> None:
    for step in steps:
        full(model(_batch(step, **batch))).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert type(a) is type(b), what
    if isinstance(a, DTensor):
        assert a.placements == b.placements, what
        a, b = a.to_local(), b.to_local()
    assert a.dtype == b.dtype and torch.equal(a, b), what


# -- a parallelized model --------------------------------------------------------------


def _gpt_trains_bit_for_bit_like_torchs_step(world: int, kind: str) -> int:
    """shardwise's own gradients (handed over with the parameter's spec), 3 steps."""
    import torch.distributed as dist

    sp = kind == "adamw"  # sequence parallel: the norms become replicated DTensors too
    mine_model, ref_model = _gpt(world, sequence_parallel=sp), _gpt(world, sequence_parallel=sp)
    if kind == "adamw":
        opts: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "foreach": True}
        mine = step_on_local_shards(torch.optim.AdamW(mine_model.parameters(), **opts))
        ref = torch.optim.AdamW(foreach_param_groups(ref_model.parameters()), **opts)
    else:
        opts = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
        mine = step_on_local_shards(torch.optim.SGD(mine_model.parameters(), **opts))
        ref = torch.optim.SGD(ref_model.parameters(), **opts)
    batch = {"world": world, "rank": dist.get_rank(), "sequence_parallel": sp}
    _train(mine_model, mine, range(3), **batch)
    _train(ref_model, ref, range(3), **batch)
    ref_params = dict(ref_model.named_parameters())
    compared = 0
    for name, p in mine_model.named_parameters():
        q = ref_params[name]
        _same(p.detach(), q.detach(), name)
        assert mine.state[p].keys() == ref.state[q].keys(), name
        for key in ref.state[q]:
            _same(mine.state[p][key], ref.state[q][key], f"{key} of {name}")
            compared += 1
    return compared


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_gpt_trains_bit_for_bit_like_torchs_step(pools, kind):
    counts = pools(2).run(_gpt_trains_bit_for_bit_like_torchs_step, 2, kind)
    assert counts[0] == counts[1] > 0


def _collectives_per_phase(world: int) -> list[dict[str, int]]:
    model = _gpt(world)
    opt = step_on_local_shards(torch.optim.AdamW(model.parameters(), foreach=True))
    _train(model, opt, range(1))  # steady state: optimizer state exists
    with CommDebugMode() as forward:
        loss = full(model(_batch(1))).square().mean()
    with CommDebugMode() as backward:
        loss.backward()
    with CommDebugMode() as step:
        opt.step()
        opt.zero_grad()
    return [comm_counts(c) for c in (forward, backward, step)]


def test_the_step_adds_no_collective(pools):
    """2 all-reduces per GPT block forward and 2 backward, as before; none in the step."""
    per_block = {ALL_REDUCE: 2 * 2}  # 2 blocks
    assert pools(2).run(_collectives_per_phase, 2) == [[per_block, per_block, {}]] * 2


def _gpt_parity(world: int) -> None:
    check_parity(
        lambda: GPTStack(32, 4, 2),
        {"blocks.*": gpt_block_plan()},
        mesh_of(world),
        lambda step: torch.randn(8, 2, 32),
        # eps as in test_optim.py: the key bias's gradient is rounding noise.
        optimizer=lambda ps: step_on_local_shards(torch.optim.AdamW(ps, lr=1e-2, eps=1e-3, foreach=True)),
    )


@pytest.mark.parametrize("world", [1, 2])
def test_gpt_trains_like_the_single_process_reference(pools, world):
    pools(world).run(_gpt_parity, world)


# -- checkpoints: save at TP 2, load at TP 1 and 4 -------------------------------------


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True)
    return step_on_local_shards(opt)


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p.detach()).clone()
        for key, value in opt.state[p].items():
            # State of a DTensor parameter is a DTensor in its layout; ``step`` is plain.
            assert isinstance(value, DTensor) is (isinstance(p, DTensor) and key != "step"), (name, key)
            if isinstance(value, DTensor):
                assert value.placements == p.placements, (name, key)
            out[f"{name}.{key}"] = full(value).clone()
    return out


def _train_and_save(world: int, path: str) -> dict[str, Any]:
    model = _gpt(world)
    opt = _adamw(model)
    _train(model, opt, range(2))
    save_checkpoint(path, model, opt)
    saved = _full_state(model, opt)
    _train(model, opt, range(2, 3))
    return {"saved": saved, "after": full(model(_batch(9))).detach()}


def _load_and_continue(world: int, path: str) -> dict[str, Any]:
    model = _gpt(world, seed=1)  # other weights: the load must overwrite them
    opt = _adamw(model)  # no state yet: DCP initializes it through the local step (lr 0)
    load_checkpoint(path, model, opt)
    loaded = _full_state(model, opt)
    _train(model, opt, range(2, 3))
    return {"loaded": loaded, "after": full(model(_batch(9))).detach()}


def test_checkpoint_of_its_state_reshards(pools, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = pools(2).run(_train_and_save, 2, path)[0]
    for world in (1, 4):
        for got in pools(world).run(_load_and_continue, world, path):
            assert got["loaded"].keys() == saved["saved"].keys()
            for key, value in saved["saved"].items():
                assert torch.equal(got["loaded"][key], value), (world, key)  # a copy, resharded
            # One more step at another TP size: the same arithmetic in another order.
            tol = tolerance(torch.float32, reduction=4 * 32, steps=3)
            assert_close_at_scale(got["after"], saved["after"], tol=tol,
                                  scale=largest_magnitude([saved["after"]]), what=f"TP {world}")


# -- what keeps working around the step ------------------------------------------------


def _params(world: int, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    mesh = mesh_of(world)
    return [
        torch.nn.Parameter(distribute_tensor(torch.randn(4 * world, 3), mesh, [Shard(0)], src_data_rank=None)),
        torch.nn.Parameter(distribute_tensor(torch.randn(5), mesh, [Replicate()], src_data_rank=None)),
        torch.nn.Parameter(torch.randn(3)),
    ]


def _fill_grads(params: list[torch.nn.Parameter], step: int) -> None:
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


def _around_the_step(world: int) -> None:
    mine_params, ref_params = _params(world), _params(world)
    mine = step_on_local_shards(torch.optim.Adam(mine_params[:2], lr=0.01))
    assert step_on_local_shards(mine) is mine  # a second install changes nothing
    ref = torch.optim.Adam(ref_params[:2], lr=0.01)
    calls: list[str] = []
    mine.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    mine.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.5**epoch) for o in (mine, ref)]
    for step in range(4):
        if step == 2:  # a group added later, with options of its own (LambdaLR takes no
            # new groups, so from here the lr changes by hand, as the scheduler does)
            mine.add_param_group({"params": [mine_params[2]], "lr": 0.1, "amsgrad": True})
            ref.add_param_group({"params": [ref_params[2]], "lr": 0.1, "amsgrad": True})
        _fill_grads(mine_params, step)
        _fill_grads(ref_params, step)
        assert mine.step(lambda s=step: torch.tensor(float(s))) == step  # the closure's loss
        ref.step()
        if step < 2:
            for s in scheds:
                s.step()
        else:
            for g in mine.param_groups + ref.param_groups:
                g["lr"] *= 0.5
        mine.zero_grad()
        ref.zero_grad()
        assert all(p.grad is None for g in mine.param_groups for p in g["params"])
    assert calls == ["pre", "post"] * 4
    _all_same(mine, ref, mine_params, ref_params)
    assert mine.state_dict()["param_groups"] == ref.state_dict()["param_groups"]

    # A fresh optimizer that loads torch's state dict carries on as torch does.
    fresh = step_on_local_shards(torch.optim.Adam(
        [{"params": mine_params[:2]}, {"params": [mine_params[2]], "amsgrad": True}]))
    fresh.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch shares, not copies, tensors
    for step in range(4, 6):
        for opt, params in ((fresh, mine_params), (ref, ref_params)):
            _fill_grads(params, step)
            opt.step()
            opt.zero_grad()
    _all_same(fresh, ref, mine_params, ref_params)


def _all_same(mine: torch.optim.Optimizer, ref: torch.optim.Optimizer,
              mine_params: list[torch.nn.Parameter], ref_params: list[torch.nn.Parameter]) -> None:
    for p, q in zip(mine_params, ref_params):
        _same(p.detach(), q.detach(), "param")
        assert mine.state[p].keys() == ref.state[q].keys()
        for key in ref.state[q]:
            _same(mine.state[p][key], ref.state[q][key], key)


def test_hooks_closures_schedulers_groups_and_loading_keep_working(pools):
    pools(2).run(_around_the_step, 2)


# -- errors: clear, and the same on every rank -----------------------------------------


class _OwnStep(torch.optim.SGD):
    def step(self, closure: Any = None) -> Any:  # a subclass with its own update
        return super().step(closure)


def _errors(world: int) -> list[str]:
    def params() -> list[torch.nn.Parameter]:
        return _params(world)

    messages = [
        expect_raises(ValueError, step_on_local_shards,
                      torch.optim.AdamW(params(), differentiable=True), match="group 0 has differentiable=True"),
        expect_raises(TypeError, step_on_local_shards, torch.optim.RMSprop(params()),
                      match="SGD, Adam or AdamW .* got torch.optim.rmsprop.RMSprop"),
        expect_raises(TypeError, step_on_local_shards, _OwnStep(params()), match="_OwnStep"),
    ]
    with_scheduler = torch.optim.SGD(params(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(with_scheduler, step_size=1)
    messages.append(expect_raises(ValueError, step_on_local_shards, with_scheduler,
                                  match="already wrapped .* then build the scheduler"))
    newer = torch.optim.Adam(params())
    newer.defaults["a_new_option"] = True  # what a newer torch's Adam might have
    messages.append(expect_raises(ValueError, step_on_local_shards, newer, match=r"\['a_new_option'\]"))

    later = step_on_local_shards(torch.optim.SGD(params()[:2], lr=0.1))
    later.add_param_group({"params": params()[2:], "differentiable": True})
    _fill_grads([p for g in later.param_groups for p in g["params"]], 0)
    messages.append(expect_raises(ValueError, later.step, match="group 1 has differentiable=True"))

    # A gradient that does not line up with its parameter's shards.
    ps = params()
    opt = step_on_local_shards(torch.optim.SGD(ps, lr=0.1))
    _fill_grads(ps, 0)
    ps[0].grad = distribute_tensor(full(ps[0].grad), ps[0].device_mesh, [Replicate()], src_data_rank=None)
    messages.append(expect_raises(ValueError, opt.step, match=r"the grad of a parameter that is a DTensor \(Shard"))
    # State loaded in another layout.
    ps = params()
    opt = step_on_local_shards(torch.optim.Adam(ps, lr=0.1))
    _fill_grads(ps, 0)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].redistribute(placements=[Replicate()])
    opt.load_state_dict(sd)
    _fill_grads(ps, 1)
    messages.append(expect_raises(ValueError, opt.step, match=r"the exp_avg of .* is a DTensor \(Replicate"))

    # What torch itself refuses is refused the same way.
    for make, change in [
        (lambda ps: torch.optim.Adam(ps, capturable=True), None),
        (lambda ps: torch.optim.AdamW(ps, foreach=True), lambda o: o.param_groups[0].update(lr=torch.tensor(0.1))),
    ]:
        got = []
        for install in (False, True):
            ps = params()
            opt = make(ps)
            if install:
                step_on_local_shards(opt)
            if change:
                change(opt)
            _fill_grads(ps, 0)
            got.append(expect_raises((RuntimeError, AssertionError), opt.step))
        assert got[0] == got[1], got
        messages.append(got[1])
    return messages


def test_bad_options_raise_clearly_on_every_rank(pools):
    per_rank = pools(2).run(_errors, 2)
    assert per_rank[0] == per_rank[1]
    assert len(per_rank[0]) == 10
    assert "capturable" in per_rank[0][8] and "lr as a Tensor" in per_rank[0][9], per_rank[0][8:]


def test_a_copy_falls_back_to_torchs_step():
    """``deepcopy``/pickle keep what ``Optimizer.__getstate__`` keeps: not the instance's step."""
    opt = step_on_local_shards(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    assert "step" in vars(opt) and "step" not in vars(copy.deepcopy(opt))
