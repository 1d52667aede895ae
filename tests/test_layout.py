"""No import cycles inside frontends/: modules that import each other, directly or
through a chain, work only in the order someone happened to import them first, and
they hide which module depends on which. Imports inside functions and at the bottom
of a file count: they are the usual way a cycle is papered over.

A package counts as imported where a module names it (`from pkg import name`), not
where a module imports one of its submodules (Python initializes the parent then, but
every submodule would otherwise be in a cycle with a package that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of `package` it imports, anywhere in its file."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in modules and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each once, starting at its smallest module."""
    found = []

    def walk(start: str, module: str, path: list[str]) -> None:
        for nxt in sorted(graph[module]):
            if nxt == start:
                found.append(path)
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_cycles_are_found():
    """The check itself: a two-module cycle and a three-module one, and no false one."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"b"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b"], ["b", "c", "d"]]


def test_frontends_have_no_import_cycles():
    graph = import_graph("frontends")
    assert "frontends.onnx.context" in graph  # the walk found the modules
    found = [" -> ".join([*c, c[0]]) for c in cycles(graph)]
    assert not found, "import cycles in frontends/:\n" + "\n".join(found)


def test_onnx_context_is_a_leaf():
    """The import context, errors and converter table import no other module of the
    ONNX frontend, so the converters and the importer depend on it and not on each other."""
    graph = import_graph("frontends")
    assert not {m for m in graph["frontends.onnx.context"] if m.startswith("frontends.")}
