"""The ``shardwise`` command: one subcommand per module, each with ``add_parser(subparsers)``.

Example::

    $ shardwise explain meta-llama/config.json --tp 8 --seq 4096 --json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code.

    Example::

        >>> main(["explain", "config.json", "--tp", "8", "--json"])
        0
    """
    from . import explain

    parser = argparse.ArgumentParser(prog="shardwise", description="Tensor parallelism tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain.add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
