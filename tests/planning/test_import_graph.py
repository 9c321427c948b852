"""The package imports in a DAG: no module of shardwise imports, however late, one that imports it back.

Every ``import``/``from ... import`` in ``src/shardwise`` is read with ``ast``, at module
level and inside functions alike (a function-level import is still a dependency), and the
graph of shardwise modules must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardwise

ROOT = Path(shardwise.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["shardwise", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            if target is None:
                continue
            for alias in node.names:  # ``from . import collectives`` imports a module
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t in known and t != name}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    return {name: _imports(path, name, known) for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how packages work.
            if node == nxt.rpartition(".")[0] or nxt == node.rpartition(".")[0]:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_imports_in_a_dag():
    graph = _graph()
    assert "shardwise.api" in graph and "shardwise._engine.sharded_linear" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_core_does_not_import_hugging_face_code():
    graph = _graph()
    core = {"shardwise.api", "shardwise.planning.expand", "shardwise.style", "shardwise.planning.auto"}
    for name in core:
        assert not {m for m in graph[name] if m.startswith("shardwise.hf")}, name


def _layer(module: str) -> str:
    """The package a module belongs to: ``_engine``, ``styles``, ... or ``core`` (top level)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else "core"


def test_the_layers_point_one_way():
    graph = _graph()
    for name, deps in graph.items():
        layer = _layer(name)
        for dep in deps:
            there = _layer(dep)
            if layer == "_engine":
                # The engine runs inside forward/backward: it knows no style, plan or tool.
                assert there == "_engine", f"{name} imports {dep}"
            if {layer, there} == {"diagnostics", "checkpoint"}:
                raise AssertionError(f"{name} imports {dep}: diagnostics and checkpoint are peers")
            if layer in ("styles", "planning", "checkpoint") and there in ("diagnostics", "cli", "hf"):
                raise AssertionError(f"{name} imports {dep}: a lower layer imports a tool above it")
            if layer == "core" and there in ("diagnostics", "cli", "hf", "testing"):
                allowed = name in ("shardwise", "shardwise.__main__")  # the package's own index
                assert allowed, f"{name} imports {dep}"


_PRIVATE_TORCH_HOME = ROOT / "_engine" / "torch_compat.py"


def _hot_path(path: Path) -> bool:
    """The engine and the optimizer's step: where the compat page lists attribute reads."""
    return "_engine" in path.parts or path.relative_to(ROOT).as_posix() == "optim/shards.py"


def _torch_chain(node: ast.Attribute) -> bool:
    """``torch.<...>.<attr>``: an attribute chain rooted at the name ``torch``."""
    value: ast.expr = node.value
    while isinstance(value, ast.Attribute):
        value = value.value
    return isinstance(value, ast.Name) and value.id == "torch"


def _private_torch_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("torch"):
            parts = (node.module or "").split(".")
            names = [a.name for a in node.names]
            if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                found.append(f"from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if "._" in a.name and a.name.startswith("torch")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and _torch_chain(node):
            found.append(f"{ast.unparse(node)} (a private torch name)")
        elif isinstance(node, ast.Attribute) and node.attr == "_local_tensor":
            if not _hot_path(path):  # the hot paths are listed on the compat page
                found.append("._local_tensor (off the hot path, to_local() does it)")
    return found


def test_private_torch_names_live_on_the_compat_page():
    offenders = {
        str(p.relative_to(ROOT)): uses
        for p in ROOT.rglob("*.py")
        if p != _PRIVATE_TORCH_HOME and (uses := _private_torch_uses(p))
    }
    assert not offenders, offenders
