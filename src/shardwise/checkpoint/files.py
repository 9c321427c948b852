"""Atomic file operations for checkpoints: publish a new directory or file in one step.

Example::

    >>> swap_in(Path(".ckpt.tmp"), Path("ckpt"))   # ckpt is the old or the new, never half
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Union

__all__ = ["PathLike", "aside_path", "exchange", "fsync", "remove", "swap_in"]

PathLike = Union[str, "os.PathLike[str]"]


def aside_path(target: Path) -> Path:
    """Where a replaced checkpoint waits while a new one moves in (``.<name>.old``)."""
    return target.with_name(f".{target.name}.old")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the C library or file system lacks it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def swap_in(staging: Path, target: Path) -> None:
    """Move ``staging`` onto ``target``, replacing what is there, in one atomic step.

    A file replaces a file with ``os.replace``; a directory replaces a checkpoint
    directory with an atomic exchange (``staging`` then holds the old one and is removed).
    Where the file system cannot exchange, the old directory is renamed aside to
    ``.<name>.old`` first; a crash between the two renames leaves the old checkpoint
    complete there, and :func:`load_checkpoint` loads it. The aside copy, or one an
    earlier crash left, is removed once the new checkpoint is in place.
    """
    aside = aside_path(target)
    if target.is_dir() and not target.is_symlink():
        if exchange(staging, target):
            fsync(target.parent)
            remove(staging)
        else:
            remove(aside)
            os.replace(target, aside)
            os.replace(staging, target)
            fsync(target.parent)
    else:
        os.replace(staging, target)
        fsync(target.parent)
    if target.is_dir():
        remove(aside)


def remove(path: Path) -> None:
    """Delete a file, a symlink or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
