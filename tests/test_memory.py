"""Per-rank parameter memory: sharded bytes / N plus replicated bytes, exactly."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardwise import parallelize_module
from shardwise.testing import mesh_of
from shardwise.testing.models import GPTStack, gpt_block_plan


def _param_bytes(world: int, sp: bool) -> tuple[int, int, int]:
    torch.manual_seed(0)
    model = GPTStack(64, 4, depth=2)
    full = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    model = parallelize_module(model, mesh_of(world), {"blocks.*": gpt_block_plan(sp)})
    local = sharded = replicated = 0
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel() * p.element_size()
            if isinstance(p.placements[0], Shard):
                sharded += full[name]
            else:
                assert p.placements == (Replicate(),)
                replicated += full[name]
        else:
            local += p.numel() * p.element_size()
            replicated += full[name]
    return local, sharded, replicated


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_per_rank_parameter_bytes(pools, world, sp):
    for local, sharded, replicated in pools(world).run(_param_bytes, world, sp):
        assert sharded % world == 0
        assert local == sharded // world + replicated
        # q/k/v/o/up/down weights and the column biases are sharded; norms and row biases are not.
        dim = 64
        per_block_sharded = 4 * (dim * dim) + 2 * (4 * dim * dim) + 3 * dim + 4 * dim
        assert sharded == 2 * per_block_sharded * 4
        assert replicated == 2 * (4 * dim + 2 * dim) * 4
