"""``python -m shardwise``: the ``shardwise`` command (see :mod:`shardwise.cli`)."""

import sys

from shardwise.cli import main

if __name__ == "__main__":
    sys.exit(main())
