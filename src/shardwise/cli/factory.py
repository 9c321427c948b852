"""Load a user's ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) factory.

The factory takes no arguments and returns ``(model, plan, example_inputs)``. A module
path is imported normally; a file path is imported under a name derived from the file,
with its folder put on ``sys.path`` so the file's own sibling imports work.

Example::

    >>> model, plan, inputs = build("tests/verify_cases.py:good")
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build", "load_factory"]


def load_factory(spec: str) -> Callable[[], Any]:
    """The function named by ``spec`` (``package.module:function`` or ``file.py:function``).

    Example::

        >>> load_factory("shardwise.cli.charlm:verify_case")
        <function verify_case at ...>
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"expected MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{target}: no such file")
        module_name = f"_shardwise_user_{path.stem}"
        module = sys.modules.get(module_name)
        if module is None:
            sys.path.insert(0, str(path.parent))
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"{target} has no function {name!r}")
    return fn


def build(spec: str) -> tuple[Any, Any, Any]:
    """Call the factory named by ``spec``; check it returns ``(model, plan, example_inputs)``.

    Example::

        >>> model, plan, inputs = build("mypkg.models:tp_case")
    """
    made = load_factory(spec)()
    if not isinstance(made, tuple) or len(made) != 3:
        raise TypeError(
            f"{spec} must return (model, plan, example_inputs), got {type(made).__name__}"
        )
    return made
