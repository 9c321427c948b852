"""torch.compile over a parallelized model: the same losses, gradients and updates as eager."""

from __future__ import annotations

import copy

import pytest
import torch

from shardwise import foreach_param_groups, parallelize_module
from shardwise.testing import full, mesh_of
from shardwise.testing.models import GPTStack, gpt_block_plan


def _compiled_trains_like_one_process(world: int, sequence_parallel: bool) -> None:
    torch.manual_seed(0)
    ref = GPTStack(32, 4, depth=2)
    tp = parallelize_module(
        copy.deepcopy(ref), mesh_of(world), {"blocks.*": gpt_block_plan(sequence_parallel)}
    )
    # aot_eager: dynamo and AOTAutograd (what meets shardwise's hooks and autograd
    # Functions) without needing a C++ compiler for inductor's kernels.
    compiled = torch.compile(tp, backend="aot_eager")
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_tp = torch.optim.SGD(foreach_param_groups(tp.parameters()), lr=0.1, foreach=True)
    rank = torch.distributed.get_rank()
    for step in range(3):
        x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(step))
        xin = x.chunk(world, 0)[rank] if sequence_parallel else x
        want = ref(x).pow(2).mean()
        # With sequence parallelism each rank's loss is its shard's part of the mean.
        got = compiled(xin).pow(2).sum() / x.numel()
        want.backward()
        got.backward()
        for (name, p), q in zip(ref.named_parameters(), tp.parameters()):
            torch.testing.assert_close(full(q.grad), p.grad, msg=f"step {step} grad {name}")
        opt_ref.step()
        opt_tp.step()
        opt_ref.zero_grad()
        opt_tp.zero_grad()
    for (name, p), q in zip(ref.named_parameters(), tp.parameters()):
        torch.testing.assert_close(full(q.detach()), p.detach(), msg=f"param {name}")


@pytest.mark.parametrize(("world", "sequence_parallel"), [(1, False), (2, False), (2, True)])
def test_compiled_model_trains_like_one_process(pools, world, sequence_parallel):
    pools(world).run(_compiled_trains_like_one_process, world, sequence_parallel)
