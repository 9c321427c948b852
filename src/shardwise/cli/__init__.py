"""The ``shardwise`` command: one subcommand per module of this package.

Each subcommand module exposes ``add_parser(subparsers)``, which adds its parser and
sets ``func`` to a ``run(args) -> int`` (the exit status). Adding a subcommand is one
more name in :data:`SUBCOMMANDS`.

Example::

    $ shardwise train --tp 2
    $ shardwise explain ./Llama-3-70B --tp 8 --seq 4096 --json
    $ shardwise verify mypkg.models:tp_case --tp 2
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "main"]

SUBCOMMANDS = ("explain", "verify", "train")


def build_parser() -> argparse.ArgumentParser:
    """The ``shardwise`` parser with every subcommand in :data:`SUBCOMMANDS`.

    Example::

        >>> build_parser().parse_args(["train", "--tp", "2"]).tp
        2
    """
    parser = argparse.ArgumentParser(
        prog="shardwise",
        description="Tensor parallelism for PyTorch: explain what a plan costs before launch, "
        "check a plan against one device, or train a small language model with tensor "
        "parallelism on local CPU processes.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shardwise`` command line; returns the exit status.

    Example::

        >>> main(["verify", "tests/verify_cases.py:good", "--tp", "2"])
        0
    """
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status
