"""Imports flow one way: any import cycle among hookedcot's modules fails this test.

Sources are parsed, not imported. An import inside a function counts as much as one at the top
of a module (it runs too, only later); one under `if TYPE_CHECKING:` does not (it never runs).
`from package import name` is an edge to the submodule when `name` is one, else to the package.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dotted package name -> its folder (conversions/ installs as hookedcot.conversions)
PACKAGES = {"hookedcot": ROOT / "hookedcot", "hookedcot.conversions": ROOT / "conversions"}

Edges = dict[tuple[str, str], list[str]]  # (importer, imported) -> where: "path:line"


def project_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the packages' folders."""
    modules = {}
    for prefix, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every Import / ImportFrom node below `node`, except those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `import name` runs last: the longest dotted prefix that is one."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path], root: Path = ROOT) -> Edges:
    edges: Edges = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_owner(alias.name, modules) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: climb level - 1 packages up from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else _owner(base, modules))
            where = f"{path.relative_to(root)}:{node.lineno}"
            for target in dict.fromkeys(t for t in targets if t is not None):
                edges.setdefault((module, target), []).append(where)
    return edges


def import_cycles(edges: Edges) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules that import themselves
    (Tarjan's algorithm), each sorted, in sorted order."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or (node, node) in edges:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def describe(cycles: list[list[str]], edges: Edges) -> str:
    lines = []
    for cycle in cycles:
        lines.append("cycle: " + " <-> ".join(cycle))
        members = set(cycle)
        for (a, b), where in sorted(edges.items()):
            if a in members and b in members:
                lines.append(f"    {a} -> {b}   ({', '.join(where)})")
    return "\n".join(lines)


def test_no_import_cycles_in_hookedcot():
    modules = project_modules(PACKAGES)
    assert "hookedcot.conversions.registry" in modules and "hookedcot.interp.patching" in modules
    edges = import_graph(modules)
    cycles = import_cycles(edges)
    assert not cycles, "imports must flow one way; these modules import each other:\n" + describe(cycles, edges)


def test_the_detector_finds_cycles_through_functions_relative_imports_and_from_imports(tmp_path):
    files = {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\nthing = 1\n\ndef later():\n    from . import b\n    return b\n",
        "b.py": "from pkg.sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import thing\n",  # a -> b -> sub.c -> a, each edge a different kind
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\nelse:\n    import json\n",
        "e.py": "import pkg.d\n",  # d -> e only under TYPE_CHECKING: no cycle
        "f.py": "import pkg.f\n",  # a self-loop
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(textwrap.dedent(text))
    modules = project_modules({"pkg": tmp_path / "pkg"})
    edges = import_graph(modules, root=tmp_path)
    assert ("pkg.a", "pkg.b") in edges and ("pkg.b", "pkg.sub.c") in edges and ("pkg.sub.c", "pkg.a") in edges
    assert ("pkg.d", "pkg.e") not in edges and ("pkg", "pkg.a") in edges
    cycles = import_cycles(edges)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.f"]]
    report = describe(cycles, edges)
    assert "pkg.a -> pkg.b   (pkg/a.py:5)" in report and "pkg.sub.c -> pkg.a   (pkg/sub/c.py:1)" in report
