"""Plan faults: ranks given different plans or models, wrapped models, bad arguments.

Each case asserts the exact outcome: the single-process answer, or the same error on
every rank within the pool's short timeout, with the process group usable afterwards
and nothing moved.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from outcomes import TIMEOUT, group_works, outcome
from torch import nn
from torch.distributed.tensor import DTensor

import shardwise
from models import MLP
from shardwise import (
    ColwiseParallel,
    PairwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from shardwise.testing import check_parity, mesh_of


class QK(nn.Module):
    """q and k of one shape: swapping their shards changes the result, not the shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 32)
        self.k = nn.Linear(16, 32)
        self.o = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.q(x)) - self.k(x))


# -- the same plan, in another key order on each rank ---------------------------------------
def _plan_in_rank_order(world: int) -> int:
    entries = [("q", ColwiseParallel()), ("k", ColwiseParallel()), ("o", RowwiseParallel())]
    # A plan built from a set: its order differs per process under torchrun's hash seed.
    order = entries if dist.get_rank() % 2 == 0 else entries[::-1]
    report = check_parity(QK, dict(order), mesh_of(world), lambda step: torch.randn(4, 16))
    assert group_works() == world
    return report.steps


@pytest.mark.parametrize("world", [2, 4])
def test_same_plan_in_another_key_order_gives_the_right_answer(pools, world):
    assert pools(world).run(_plan_in_rank_order, world, timeout=TIMEOUT) == [3] * world


# -- different plans or models on different ranks ----------------------------------------------
def _differing(world: int, case: str) -> tuple[str, str, bool]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model: nn.Module = QK()
    plan: dict[str, object] = {"q": ColwiseParallel(), "k": ColwiseParallel(), "o": RowwiseParallel()}
    if case == "styles" and rank == 1:
        plan = {"q": RowwiseParallel(), "k": ColwiseParallel(), "o": ColwiseParallel()}
    elif case == "dtype" and rank == 1:
        model = model.double()
    elif case == "shape" and rank == 1:
        model.k = nn.Linear(16, 32, bias=False)
    elif case == "missing" and rank == 1:
        del plan["o"]
    result = outcome(lambda: parallelize_module(model, mesh_of(world), plan))
    untouched = not any(isinstance(p, DTensor) for p in model.parameters())
    return (*result, untouched)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("styles", "First difference, at step 0 in module order: rank(s) [0, 2, 3]: 'q': "
                   "ColwiseParallel(_prepare_input=make_input_replicate_1d, "
                   "_prepare_output=make_sharded_output_tensor) on Linear[weight (32, 16) "
                   "float32 cpu, bias (32,) float32 cpu]; rank(s) [1]: 'q': RowwiseParallel("),
        ("dtype", "rank(s) [0, 2, 3]: 'q': ColwiseParallel"),
        ("shape", "First difference, at step 1 in module order"),
        ("missing", "Steps per rank: rank 0: 3, rank 1: 2, rank 2: 3, rank 3: 3"),
    ],
)
def test_differing_plans_raise_on_every_rank(pools, case, expected):
    # Rank 1 differs from the others: that hung (styles), or scattered shards into the
    # wrong parameters. Now every rank raises the same error, before anything moved.
    results = pools(4).run(_differing, 4, case, timeout=TIMEOUT)
    kinds = {r[0] for r in results}
    messages = {r[1] for r in results}
    assert kinds == {"ValueError"} and len(messages) == 1, results
    message = messages.pop()
    assert "the 4 ranks [0, 1, 2, 3] of the tensor-parallel group were given different" in message
    assert expected in message, message
    if case == "dtype":
        assert "float64" in message and "float32" in message
    assert all(r[2] for r in results)  # nothing was scattered


def _agreement_is_one_small_collective(world: int) -> dict[str, int]:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comms:
        parallelize_module(MLP(), mesh_of(world), {"net1": ColwiseParallel()})
    return {str(k): v for k, v in comms.get_comm_counts().items()}


def test_agreement_costs_one_all_gather(pools):
    # One Colwise Linear: two weight scatters plus the fingerprint's one all-gather.
    counts = pools(2).run(_agreement_is_one_small_collective, 2, timeout=TIMEOUT)
    assert counts[0] == counts[1]
    assert sum(v for k, v in counts[0].items() if "all_gather" in k or "allgather" in k) == 1, counts


# -- wrapped models ------------------------------------------------------------------------------
def _wrapped(world: int, kind: str) -> tuple[str, str]:
    torch.manual_seed(0)
    model = MLP()
    if kind == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        wrapped = nn.Sequential(nn.parallel.DistributedDataParallel(model))
    return outcome(lambda: parallelize_module(wrapped, mesh_of(world), PairwiseParallel()))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("ddp", "parallelize_module: the model is wrapped in DistributedDataParallel (DDP)"),
        ("fsdp1", "the model is wrapped in FullyShardedDataParallel (FSDP1)"),
        ("nested", "'0' is wrapped in DistributedDataParallel (DDP)"),
    ],
)
def test_wrapped_models_are_refused(pools, kind, expected):
    results = pools(2).run(_wrapped, 2, kind, timeout=TIMEOUT)
    assert results[0] == results[1]
    kind_, message = results[0]
    assert kind_ == "TypeError"
    assert expected in message, message
    assert "apply tensor parallelism to the unwrapped model first" in message
    assert "tp_mesh_dim=1" in message


def _ddp_after_tensor_parallelism(world: int, how: str) -> tuple[str, str]:
    """The order DDP users try: parallelize over tp, then DDP over dp. DDP must refuse."""
    mesh2d = mesh_of(world, 1, names=("dp", "tp"))
    torch.manual_seed(0)
    model = parallelize_module(MLP(), mesh2d, PairwiseParallel(), tp_mesh_dim=1)
    ddp = nn.parallel.DistributedDataParallel
    if how == "group":
        return outcome(lambda: ddp(model, process_group=mesh2d.get_group("dp")))
    if how == "no_init_sync":  # used to run, never syncing the gradients
        return outcome(lambda: ddp(model, process_group=mesh2d.get_group("dp"), init_sync=False))
    return outcome(lambda: ddp(model, device_mesh=mesh2d["dp"]))


@pytest.mark.parametrize("how", ["group", "no_init_sync", "mesh"])
def test_ddp_after_tensor_parallelism_is_refused_with_what_works(pools, how):
    results = pools(2).run(_ddp_after_tensor_parallelism, 2, how, timeout=TIMEOUT)
    assert results[0] == results[1]
    kind, message = results[0]
    assert kind == "TypeError", results[0]
    assert "DistributedDataParallel cannot synchronize a model parallelized by shardwise" in message
    assert "fully_shard(model, mesh=mesh2d['dp'])" in message


# -- arguments -------------------------------------------------------------------------------------
def _tp_mesh_dim_bool(world: int) -> tuple[str, str]:
    return outcome(lambda: parallelize_module(MLP(), mesh_of(world), PairwiseParallel(),
                                               tp_mesh_dim=True))


def test_tp_mesh_dim_true_is_rejected(pools):
    results = pools(2).run(_tp_mesh_dim_bool, 2, timeout=TIMEOUT)
    assert results == [("ValueError", "tp_mesh_dim must be an int mesh dimension, got True (bool).")] * 2


def test_seed_defaults_are_stored():
    for style in (PairwiseParallel(), PairwiseParallel(None, None),
                  PairwiseParallel(_prepare_input=None, _prepare_output=None)):
        assert style._prepare_input is shardwise.make_input_replicate_1d
        assert style._prepare_output is shardwise.make_output_tensor
    custom = PairwiseParallel(shardwise.make_input_reshard_replicate, None)
    assert custom._prepare_input is shardwise.make_input_reshard_replicate
    assert custom._prepare_output is shardwise.make_output_tensor
    sp = SequenceParallel()
    assert sp._prepare_input is shardwise.make_input_reshard_replicate
    assert sp._prepare_output is shardwise.make_output_reshard_tensor


def test_plan_in_another_order_is_applied_in_module_order():
    from shardwise.planning.agreement import canonical_order

    class Step:
        def __init__(self, fqn: str, module: nn.Module) -> None:
            self.fqn, self.module, self.what = fqn, module, ""

    model = QK()
    steps = [Step("o", model.o), Step("k", model.k), Step("q", model.q)]
    assert [s.fqn for s in canonical_order(model, steps)] == ["q", "k", "o"]
    assert [s.fqn for s in canonical_order(model, steps[::-1])] == ["q", "k", "o"]
