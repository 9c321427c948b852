"""torch 2.x layouts on ColwiseParallel/RowwiseParallel, PrepareModuleInput/Output, uneven features.

Every layout combination is checked against a single-process reference (outputs, input
gradient, every parameter gradient, optimizer steps), the fast paths' collectives are
counted, and bad arguments fail on every rank before any collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from models import MLP
from shardwise import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    make_input_reshard_replicate,
    make_output_reshard_tensor,
    parallelize_module,
)
from shardwise.testing import check_parity, expect_raises, full, mesh_of
from shardwise.testing.comms import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    fwd_bwd_counts,
)
from shardwise.testing.models import GPTBlock, gpt_block_plan

WORLDS = [1, 2, 4]
AR, AG, RS = ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER


# -- helpers (also used by test_embedding) ----------------------------------------------------
def io_parity(
    build: Callable[[], nn.Module],
    plan: Any,
    world: int,
    make_input: Callable[[int], torch.Tensor],
    *,
    in_dim: int | None = None,
    out_dim: int | None = None,
    steps: int = 2,
) -> int:
    """Parity where input and output shardings differ (check_parity shards both alike).

    Each rank feeds its chunk of the input along ``in_dim`` (all of it if ``None``) and
    must return its chunk of the reference output along ``out_dim`` (or the full output,
    plain or DTensor). Returns the number of gradients compared.
    """
    mesh = mesh_of(world)
    rank = mesh.get_local_rank()
    torch.manual_seed(0)
    ref = build()
    tp = parallelize_module(copy.deepcopy(ref), mesh, plan)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_tp = torch.optim.SGD(tp.parameters(), lr=0.1, momentum=0.9)
    tp_params = dict(tp.named_parameters())

    def mine(t: torch.Tensor, dim: int | None) -> torch.Tensor:
        return t if dim is None else t.chunk(world, dim)[rank]

    compared = 0
    for step in range(steps):
        x = make_input(step)
        grad_in = x.is_floating_point()
        x_ref = x.clone().requires_grad_(grad_in)
        x_tp = mine(x, in_dim).clone().requires_grad_(grad_in)
        out_ref, out_tp = ref(x_ref), full(tp(x_tp))
        torch.testing.assert_close(out_tp, mine(out_ref.detach(), out_dim))
        weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(step))
        (out_ref * weight).sum().backward()
        (out_tp * mine(weight, out_dim)).sum().backward()
        if grad_in:
            torch.testing.assert_close(x_tp.grad, mine(x_ref.grad, in_dim))
        for name, p in ref.named_parameters():
            torch.testing.assert_close(
                full(tp_params[name].grad), p.grad, msg=lambda m, name=name: f"grad of {name}: {m}"
            )
            compared += 1
        for opt in (opt_ref, opt_tp):
            opt.step()
            opt.zero_grad()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full(tp_params[name].detach()), p.detach())
    return compared


# -- models -----------------------------------------------------------------------------------
class Attn(nn.Module):
    """An attention-shaped block without the softmax: q/k/v in, o out, per-feature mixing."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):
            assert x.placements == (Replicate(),), (
                x.placements
            )  # what PrepareModuleInput handed over
        return self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


class Block(nn.Module):
    """Pre-norm residual block over ``[B, S, H]``: ``x + attn(norm(x))``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class NormHead(nn.Module):
    """A norm wrapped in ``body`` (so a hook style can sit on the wrapper), then a projection."""

    def __init__(self, dim: int = 16, out: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(dim))
        self.proj = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


def block_plan(local: bool) -> dict[str, Any]:
    """torchtitan's attention plan, sequence dim 1: SP norm, gather at the block, scatter out."""
    col = ColwiseParallel()
    return {
        "norm": SequenceParallel(),
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=local
        ),
        "attn.q": col,
        "attn.k": col,
        "attn.v": col,
        "attn.o": RowwiseParallel(output_layouts=Shard(1)),
    }


def gpt_layout_plan() -> dict[str, Any]:
    """gpt_block_plan(sequence_parallel=True) written with torch 2.x layouts ([S, B, C])."""
    col, row, sp = (
        ColwiseParallel(input_layouts=Shard(0)),
        RowwiseParallel(output_layouts=Shard(0)),
        SequenceParallel(),
    )
    return {"ln1": sp, "q": col, "k": col, "v": col, "o": row, "ln2": sp, "up": col, "down": row}


# -- parity bodies ----------------------------------------------------------------------------
def x3(step: int) -> torch.Tensor:
    return torch.randn(2, 8, 16)


CASES: dict[str, Callable[[int], int]] = {
    # ColwiseParallel/RowwiseParallel layouts on an MLP, sequence dim 1 and 0.
    "sp_dim1": lambda w: (
        check_parity(
            MLP,
            {
                "net1": ColwiseParallel(input_layouts=Shard(1)),
                "net2": RowwiseParallel(output_layouts=Shard(1)),
            },
            mesh_of(w),
            x3,
            sequence_dim=1,
        ).grads
    ),
    "sp_dim0": lambda w: (
        check_parity(
            MLP,
            {
                "net1": ColwiseParallel(input_layouts=(Shard(0),)),
                "net2": RowwiseParallel(output_layouts=(Shard(0),)),
            },
            mesh_of(w),
            lambda s: torch.randn(8, 2, 16),
            sequence_dim=0,
        ).grads
    ),
    "default_layouts": lambda w: (
        check_parity(
            MLP,
            {
                "net1": ColwiseParallel(input_layouts=Replicate()),
                "net2": RowwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate()),
            },
            mesh_of(w),
            x3,
        ).grads
    ),
    "colwise_gathered": lambda w: (
        check_parity(
            MLP, {"net1": ColwiseParallel(output_layouts=Replicate())}, mesh_of(w), x3
        ).grads
    ),
    "colwise_dtensor_uneven": lambda w: (
        check_parity(
            lambda: nn.Linear(16, 10), ColwiseParallel(use_local_output=False), mesh_of(w), x3
        ).grads
    ),
    "colwise_replicate_dtensor": lambda w: (
        check_parity(
            lambda: nn.Linear(16, 10),
            ColwiseParallel(output_layouts=Replicate(), use_local_output=False),
            mesh_of(w),
            x3,
        ).grads
    ),
    "colwise_last_dim_in": lambda w: (
        check_parity(
            lambda: nn.Linear(16, 8),
            ColwiseParallel(input_layouts=Shard(-1)),
            mesh_of(w),
            x3,
            sequence_dim=-1,
        ).grads
    ),
    "rowwise_scatter_last_dim": lambda w: (
        check_parity(
            lambda: nn.Linear(16, 8),
            RowwiseParallel(output_layouts=Shard(-1)),
            mesh_of(w),
            x3,
            sequence_dim=-1,
        ).grads
    ),
    "rowwise_replicated_in_dtensor": lambda w: (
        check_parity(
            lambda: nn.Linear(10, 8),
            RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
            mesh_of(w),
            lambda s: torch.randn(2, 5, 10),
        ).grads
    ),
    "rowwise_partial_dtensor": lambda w: (
        check_parity(
            lambda: nn.Linear(16, 8),
            RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Partial(), use_local_output=False
            ),
            mesh_of(w),
            x3,
        ).grads
    ),
    "rowwise_uneven_sequence_scatter": lambda w: _uneven_scatter(w),
    "uneven_mlp": lambda w: (
        check_parity(
            lambda: MLP(16, 10),
            {"net1": ColwiseParallel(), "net2": RowwiseParallel()},
            mesh_of(w),
            x3,
        ).grads
    ),
    "gpt_layout_plan": lambda w: (
        check_parity(
            lambda: GPTBlock(32, 4),
            gpt_layout_plan(),
            mesh_of(w),
            lambda s: torch.randn(8, 2, 32),
            sequence_dim=0,
        ).grads
    ),
    # PrepareModuleInput/Output.
    "prepare_input_dtensor": lambda w: (
        check_parity(Block, block_plan(local=False), mesh_of(w), x3, sequence_dim=1).grads
    ),
    "prepare_input_local": lambda w: (
        check_parity(Block, block_plan(local=True), mesh_of(w), x3, sequence_dim=1).grads
    ),
    "prepare_input_on_sharded_linear": lambda w: (
        check_parity(
            # Two entries cover net1 ("net1" and the glob "net[1]"): the hook style claims nothing.
            MLP,
            {
                "net1": ColwiseParallel(),
                "net[1]": PrepareModuleInput(
                    input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_output=True
                ),
                "net2": RowwiseParallel(output_layouts=Shard(1)),
            },
            mesh_of(w),
            x3,
            sequence_dim=1,
        ).grads
    ),
    "prepare_output_gather": lambda w: io_parity(
        NormHead,
        {
            "body": PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate()
            ),
            "body.0": SequenceParallel(),
            "proj": ColwiseParallel(output_layouts=Replicate()),
        },
        w,
        x3,
        in_dim=1,
    ),
    "prepare_output_dtensor": lambda w: io_parity(
        NormHead,
        {
            "body": PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
            ),
            "body.0": SequenceParallel(),
            "proj": ColwiseParallel(output_layouts=Replicate()),
        },
        w,
        x3,
        in_dim=1,
    ),
    "prepare_input_output_scatter": lambda w: io_parity(
        # Replicated in, sequence-sharded out: split the input, gather back, split the output.
        lambda: nn.Sequential(nn.LayerNorm(16)),
        {
            "": PrepareModuleInputOutput(
                input_layouts=Replicate(),
                desired_input_layouts=Shard(1),
                use_local_input=True,
                output_layouts=Shard(1),
                desired_output_layouts=Shard(1),
            ),
            "0": SequenceParallel(),
        },
        w,
        x3,
        out_dim=1,
    ),
}


def _uneven_scatter(world: int) -> int:
    # A sequence of 4W+2 rows reduce-scattered over W ranks: torch.chunk pieces.
    mesh = mesh_of(world)
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    tp = parallelize_module(
        copy.deepcopy(ref),
        mesh,
        RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0), use_local_output=False),
    )
    x = torch.randn(4 * world + 2, 16)
    out = tp(x)
    assert (
        isinstance(out, DTensor)
        and out.placements == (Shard(0),)
        and out.shape == (4 * world + 2, 8)
    )
    torch.testing.assert_close(out.full_tensor(), ref(x))
    out.full_tensor().sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(full(tp.weight.grad), ref.weight.grad)
    return 1


def _case(world: int, name: str) -> int:
    return CASES[name](world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_parity(pools, world, name):
    # Each body asserts parity itself and returns how many tensors it compared: every
    # rank must have compared the same non-zero number (none skipped a check).
    counts = pools(world).run(_case, world, name)
    assert len(counts) == world and counts[0] >= 1 and counts == [counts[0]] * world, counts


# -- collective counts ------------------------------------------------------------------------
def _count_case(world: int, name: str) -> tuple[dict[str, int], dict[str, int]]:
    torch.manual_seed(0)
    mesh = mesh_of(world)
    if name == "sp_mlp":
        model = parallelize_module(
            MLP(),
            mesh,
            {
                "net1": ColwiseParallel(input_layouts=Shard(1)),
                "net2": RowwiseParallel(output_layouts=Shard(1)),
            },
        )
        return fwd_bwd_counts(model, torch.randn(2, 8 // world, 16))
    if name == "seed_sp_mlp":  # the same plan spelled with the seed's functions
        model = parallelize_module(
            MLP(),
            mesh,
            {
                "net1": ColwiseParallel(_prepare_input=make_input_reshard_replicate),
                "net2": RowwiseParallel(_prepare_output=make_output_reshard_tensor),
            },
        )
        return fwd_bwd_counts(model, torch.randn(8 // world, 2, 16))
    if name == "gpt_layouts":
        model = parallelize_module(GPTBlock(32, 4), mesh, gpt_layout_plan())
        return fwd_bwd_counts(model, torch.randn(16 // world, 2, 32))
    if name == "gpt_seed":
        model = parallelize_module(GPTBlock(32, 4), mesh, gpt_block_plan(sequence_parallel=True))
        return fwd_bwd_counts(model, torch.randn(16 // world, 2, 32))
    if name in ("block_dtensor", "block_local"):
        model = parallelize_module(Block(), mesh, block_plan(local=name == "block_local"))
        return fwd_bwd_counts(model, torch.randn(2, 8 // world, 16))
    if name == "uneven_colwise_gather":
        model = parallelize_module(
            nn.Linear(16, 10), mesh, ColwiseParallel(output_layouts=Replicate())
        )
        return fwd_bwd_counts(model, torch.randn(3, 16))
    if name == "uneven_rowwise_scatter_in":
        model = parallelize_module(
            nn.Linear(10, 16), mesh, RowwiseParallel(input_layouts=Replicate())
        )
        return fwd_bwd_counts(model, torch.randn(3, 10))
    raise KeyError(name)


EXPECTED_COUNTS = {
    # Sequence-parallel pair: all-gather in, reduce-scatter out; backward mirrors, plus one
    # all-gather of the saved sequence shard for the column layer's weight gradient.
    "sp_mlp": ({AG: 1, RS: 1}, {AG: 2, RS: 1}),
    "seed_sp_mlp": ({AG: 1, RS: 1}, {AG: 2, RS: 1}),
    # GPT block: q/k/v share one all-gather each way; 4 all-reduces sum the SP LayerNorms' grads.
    "gpt_layouts": ({AG: 2, RS: 2}, {AG: 4, RS: 2, AR: 4}),
    "gpt_seed": ({AG: 2, RS: 2}, {AG: 4, RS: 2, AR: 4}),
    # PrepareModuleInput handing q/k/v a DTensor: its gradient comes back Partial and one
    # reduce-scatter sums and splits it. Local tensors: one all-reduce (f), then a split.
    "block_dtensor": ({AG: 1, RS: 1}, {AG: 1, RS: 1, AR: 2}),
    "block_local": ({AG: 1, RS: 1}, {AG: 1, AR: 3}),
    # Uneven (torch.chunk) features: still one padded collective each way.
    "uneven_colwise_gather": ({AG: 1}, {AR: 1}),
    "uneven_rowwise_scatter_in": ({AR: 1}, {AG: 1}),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_collective_counts(pools, world, name):
    for fwd, bwd in pools(world).run(_count_case, world, name):
        assert (fwd, bwd) == EXPECTED_COUNTS[name]


# -- DTensor outputs --------------------------------------------------------------------------
def _dtensor_outputs(world: int) -> None:
    mesh = mesh_of(world)
    x = torch.randn(2, 3, 16)

    def out(module: nn.Module, style: Any, inp: torch.Tensor = x) -> Any:
        return parallelize_module(module, mesh, style)(inp)

    y = out(nn.Linear(16, 10), ColwiseParallel(use_local_output=False))
    assert isinstance(y, DTensor) and y.placements == (Shard(2),) and y.shape == (2, 3, 10)
    y = out(nn.Linear(16, 10), ColwiseParallel(output_layouts=Replicate(), use_local_output=False))
    assert y.placements == (Replicate(),) and y.to_local().shape == (2, 3, 10)
    y = out(nn.Linear(16, 8), RowwiseParallel(input_layouts=Replicate(), use_local_output=False))
    assert y.placements == (Replicate(),) and y.shape == (2, 3, 8)
    y = out(
        nn.Linear(16, 8),
        RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
    )
    assert y.placements == (Shard(1),) and y.shape == (2, 3, 8)
    y = out(
        nn.Linear(16, 8),
        RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Partial(), use_local_output=False
        ),
    )
    assert y.placements == (Partial(),) and y.shape == (2, 3, 8)
    # Plain local tensors by default; uneven shards have torch.chunk sizes.
    y = out(nn.Linear(16, 10), ColwiseParallel())
    assert type(y) is torch.Tensor and y.shape[-1] == (
        -(-10 // world) if mesh.get_local_rank() < 3 else 1
    )
    # The seed's output functions still give what they gave.
    assert isinstance(out(nn.Linear(16, 8), ColwiseParallel(_prepare_output=None)), DTensor)

    seen = parallelize_module(
        nn.Identity(),
        mesh,
        PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate()),
    )(torch.randn(2, 3, 16))
    assert isinstance(seen, DTensor) and seen.placements == (Replicate(),)
    assert seen.shape == (2, 3 * world, 16) and seen.to_local().shape == (2, 3 * world, 16)
    probe = nn.Identity()
    y = parallelize_module(
        probe,
        mesh,
        PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(0), use_local_output=False
        ),
    )(x)
    assert isinstance(y, DTensor) and y.placements == (Shard(0),) and y.shape == x.shape
    # None entries are left alone; keyword arguments have their own layouts.
    pair = parallelize_module(
        Pair(),
        mesh,
        PrepareModuleInput(
            input_layouts=(Shard(0), None),
            desired_input_layouts=(Replicate(), None),
            input_kwarg_layouts={"c": Replicate()},
            desired_input_kwarg_layouts={"c": Shard(1)},
            use_local_output=True,
        ),
    )
    a, b, c = torch.randn(2, 16), torch.randn(5), torch.randn(3, 4 * world)
    ga, gb, gc = pair(a, b, c=c)
    assert type(ga) is torch.Tensor and ga.shape == (2 * world, 16) and gb is b
    torch.testing.assert_close(gc, c.chunk(world, 1)[mesh.get_local_rank()])
    # A DTensor argument is redistributed by DTensor.
    dt = DTensor.from_local(a, mesh, [Shard(0)], run_check=False)
    ga, _, _ = pair(dt, b, c=c)
    assert type(ga) is torch.Tensor and ga.shape == (2 * world, 16)


class Pair(nn.Module):
    """Returns its arguments, so a test sees what a hook made of them."""

    def forward(self, a: Any, b: Any, c: Any = None) -> tuple[Any, Any, Any]:
        return a, b, c


def test_dtensor_outputs_and_placements(pools):
    for world in (1, 2, 4):
        pools(world).run(_dtensor_outputs, world)


# -- errors -----------------------------------------------------------------------------------
def _runtime_errors(world: int) -> list[str]:
    mesh = mesh_of(world)
    msgs = []
    # Valid setups, built first: a valid plan's ranks agree on it in one all-gather.
    m_in = parallelize_module(
        nn.Identity(),
        mesh,
        PrepareModuleInput(
            input_layouts=(Shard(0), Replicate()), desired_input_layouts=(Replicate(), Shard(0))
        ),
    )
    m_out = parallelize_module(
        nn.Identity(),
        mesh,
        PrepareModuleOutput(
            output_layouts=(Shard(0), None), desired_output_layouts=(Replicate(), None)
        ),
    )
    with CommDebugMode() as comms:
        msgs.append(
            expect_raises(
                RuntimeError,
                parallelize_module,
                nn.LayerNorm(8),
                mesh,
                RowwiseParallel(output_layouts=Shard(1)),
                match="Linear or torch.nn.Embedding",
            )
        )
        if world == 4:
            msgs.append(
                expect_raises(
                    ValueError,
                    parallelize_module,
                    MLP(16, 32),
                    mesh,
                    {
                        "net1": ColwiseParallel(),
                        "net2": RowwiseParallel(),
                        "": {"net1": ColwiseParallel(output_layouts=Replicate())},
                    },
                    match="two plan entries",
                )
            )
            msgs.append(
                expect_raises(
                    ValueError,
                    parallelize_module,
                    nn.Linear(8, 3),
                    mesh,
                    ColwiseParallel(use_local_output=False),
                    match="out_features=3",
                )
            )
        msgs.append(expect_raises(ValueError, m_in, torch.ones(2, 4), match="same length"))
        msgs.append(expect_raises(TypeError, m_in, torch.ones(2, 4), 3, match="input 1"))
        msgs.append(
            expect_raises(ValueError, m_out, torch.ones(2, 4), match="outputs and output_layouts")
        )
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    return msgs


@pytest.mark.parametrize("world", [2, 4])
def test_runtime_errors_on_every_rank(pools, world):
    results = pools(world).run(_runtime_errors, world, timeout=60)
    assert len({tuple(r) for r in results}) == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="not both"):
        ColwiseParallel(make_input_reshard_replicate, input_layouts=Shard(0))
    with pytest.raises(ValueError, match="not both"):
        RowwiseParallel(_prepare_output=make_output_reshard_tensor, use_local_output=False)
    with pytest.raises(TypeError, match="Placement"):
        ColwiseParallel(input_layouts="replicate")
    with pytest.raises(TypeError, match="Placement"):
        RowwiseParallel(output_layouts=(Shard(0), Shard(1)))
    with pytest.raises(TypeError, match="bool"):
        ColwiseParallel(use_local_output=None)
    with pytest.raises(ValueError, match="same length"):
        PrepareModuleInput(input_layouts=Shard(0), desired_input_layouts=(Replicate(), None))
    with pytest.raises(ValueError, match="should not be None"):
        PrepareModuleInput(input_layouts=Shard(0))
    with pytest.raises(ValueError, match="same length"):
        PrepareModuleInput(input_kwarg_layouts={"x": Shard(0)}, desired_input_kwarg_layouts={})
    with pytest.raises(ValueError, match="same length"):
        PrepareModuleOutput(output_layouts=(Shard(0), None), desired_output_layouts=Replicate())


def test_style_attributes_and_repr():
    col = ColwiseParallel()
    assert col.input_layouts == (Replicate(),) and col.output_layouts == (Shard(-1),)
    assert col.use_local_output and "_prepare_input=make_input_replicate_1d" in repr(col)
    row = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    assert row.input_layouts == (Shard(-1),) and row.output_layouts == (Shard(1),)
    assert not row.use_local_output and row._prepare_input is None
    assert repr(row) == (
        "RowwiseParallel(input_layouts=(Shard(dim=-1),), "
        "output_layouts=(Shard(dim=1),), use_local_output=False)"
    )
    seed = ColwiseParallel(make_input_reshard_replicate)
    assert seed.input_layouts == (Shard(0),) and seed._prepare_input is make_input_reshard_replicate
    assert "PrepareModuleInput(input_layouts=(Shard(dim=1), None)" in repr(
        PrepareModuleInput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        )
    )
