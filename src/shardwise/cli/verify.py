"""``shardwise verify MODEL --tp N``: does this plan compute what one device computes?

Starts N local gloo ranks, builds ``(model, plan, example_inputs)`` from MODEL on each,
and runs :func:`shardwise.verify`. Exit status 0 when everything matches, 1 at the
first divergence (named in the output), 2 when MODEL cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``verify`` to the ``shardwise`` command's subparsers."""
    parser = commands.add_parser(
        "verify",
        help="compare a TP plan with one device, module by module",
        description="Run a model under its tensor-parallel plan on N local CPU processes next to "
        "the same model on one device, and compare, module by module in execution order, "
        "every input and output, every gradient, and the parameters after each optimizer "
        "step. Prints where they first differ and where to look. Exit status: 0 if they "
        "match, 1 if not, 2 if MODEL cannot be loaded.",
        epilog="example: shardwise verify shardwise.cli.charlm:verify_case --tp 2",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="package.module:function or path/to/file.py:function; the function takes no "
        "arguments and returns (model, plan, example_inputs), the inputs for one device",
    )
    parser.add_argument(
        "--tp", type=int, default=2, help="tensor-parallel size: local ranks to start (default 2)"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer steps to compare (default 2)"
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance (default: from the dtype)"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance (default: from the dtype)"
    )
    parser.set_defaults(func=run)


def _on_rank(spec: str, steps: int, atol: float | None, rtol: float | None) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ..diagnostics.verify import verify
    from .factory import build

    model, plan, inputs = build(spec)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return verify(model, plan, inputs, mesh=mesh, steps=steps, atol=atol, rtol=rtol)


def run(args: argparse.Namespace) -> int:
    """Verify ``args.model`` on ``args.tp`` ranks; print the result; 0 if it matches, else 1."""
    from ..testing.pool import RankError, RankPool
    from .factory import build

    if args.tp < 2:
        print("shardwise verify: --tp must be at least 2", file=sys.stderr)
        return 2
    try:
        build(args.model)  # fail here, in one process, if MODEL does not load
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        print(
            f"shardwise verify: cannot load {args.model}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        with RankPool(args.tp) as pool:
            result = pool.run(
                _on_rank, args.model, args.steps, args.atol, args.rtol, timeout=900.0
            )[0]
    except RankError as exc:
        print(f"shardwise verify: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0 if result.ok else 1
