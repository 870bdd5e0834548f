"""The repository's modules import one another without a cycle.

The graph is read with ast from every .py file outside tests/, counting every import, at the top of a module
or inside a function: an import moved into a function to dodge a cycle still closes it, and is found here.
Run as a script (``python tests/test_imports.py``) it prints the cycles it finds.
"""
from __future__ import annotations

import ast
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"tests", ".venv", ".git", "__pycache__"}


def module_files(root: str = ROOT) -> dict[str, str]:
    """``{dotted module name: path}`` of every .py file of the repository outside tests/."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.startswith("."))
        for fn in filenames:
            if fn.endswith(".py"):
                parts = os.path.relpath(os.path.join(dirpath, fn), root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(dirpath, fn)
    return found


def imported_names(module: str, path: str) -> set[str]:
    """Every module name an import statement of ``path`` may load: ``a.b`` and ``a.b.c`` for
    ``from a.b import c`` (c may be a module), resolving relative imports against ``module``."""
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """``{module: the repository's modules it imports}``."""
    files = module_files(root)
    return {m: {n for n in imported_names(m, p) if n in files and n != m} for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import cycle
    lies inside one of them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    (tmp_path / "c.py").write_text("import a\n")
    assert cycles(import_graph(str(tmp_path))) == [["a", "b"]]


def test_the_cycle_finder_resolves_relative_imports_and_submodules_of_a_package(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .x import f\n")
    (tmp_path / "pkg" / "x.py").write_text("from pkg import y\n")
    (tmp_path / "pkg" / "y.py").write_text("from . import x\n")
    assert import_graph(str(tmp_path)) == {"pkg": {"pkg.x"}, "pkg.x": {"pkg", "pkg.y"}, "pkg.y": {"pkg", "pkg.x"}}
    assert cycles(import_graph(str(tmp_path))) == [["pkg", "pkg.x", "pkg.y"]]


def test_the_repository_has_no_import_cycle():
    graph = import_graph()
    assert "train" in graph and "eval.fid" in graph  # (the walk found the repository's modules)
    assert cycles(graph) == []


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    for component in found:  # each with the imports that close it
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
        print(f"{' <-> '.join(component)}: {', '.join(edges)}")
    print(f"{len(found)} import cycle(s) among {len(graph)} modules")
    sys.exit(1 if found else 0)
