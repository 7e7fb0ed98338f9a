"""The package layout: no import cycle among taskloom's modules, and no oversized file.

Run as a script to print the import graph's cycles and the longest files::

    python tests/test_layout.py

Imports are read from the source (``ast``), function-level (lazy) imports included: a lazy
import hides a cycle from the interpreter but not from a reader. Two kinds of edge are left
out: imports under ``if TYPE_CHECKING:`` (never run), and a package ``__init__`` importing its
own submodules (``taskloom/data/__init__.py`` registers its datasets that way; importing a
submodule runs its package's ``__init__`` first anyway, so that edge adds no order a reader
has to follow).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taskloom"
MAX_LINES = 450

# Files allowed over MAX_LINES for now, each with the reason (the test fails for an entry that
# is no longer over the limit, so that it cannot be forgotten).
OVER_LIMIT_ALLOWED: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, lazy imports included."""
    files = {module_name(p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        base = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                origin = node.module or ""
                if node.level:
                    anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                    origin = f"{anchor}.{origin}" if origin else anchor
                targets = [f"{origin}.{alias.name}" for alias in node.names]
            for target in targets:
                found = resolve(target)
                if found is None or found == name:
                    continue
                if is_package and found.startswith(name + "."):
                    continue  # a package importing its own submodule (see the module docstring)
                graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def line_counts(package: Path = PACKAGE) -> dict[str, int]:
    return {str(p.relative_to(package)): len(p.read_text(encoding="utf-8").splitlines())
            for p in sorted(package.rglob("*.py"))}


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "taskloom.errors" in graph["taskloom.cli"]  # top-level import
    assert "taskloom.tables" in graph["taskloom.cli"]  # function-level import in _print_final


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_taskloom_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_file_over_the_line_limit():
    counts = line_counts()
    over = {path: n for path, n in counts.items() if n > MAX_LINES and path not in OVER_LIMIT_ALLOWED}
    assert not over, f"files over {MAX_LINES} lines (split them): {over}"
    stale = [path for path in OVER_LIMIT_ALLOWED if counts.get(path, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines: remove {stale} from OVER_LIMIT_ALLOWED"


if __name__ == "__main__":
    graph = import_graph()
    for component in cycles(graph):
        print("cycle:", " <-> ".join(component))
        for v in component:
            print(f"  {v} -> {', '.join(sorted(graph[v] & set(component)))}")
    for path, n in sorted(line_counts().items(), key=lambda item: -item[1])[:10]:
        print(f"{n:5d}  {path}{'  (allowed for now)' if path in OVER_LIMIT_ALLOWED else ''}")
    sys.exit(1 if cycles(graph) else 0)
