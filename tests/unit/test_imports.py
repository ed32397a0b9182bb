"""`distill_ray`'s modules import each other without a cycle (read statically: every import, function-level
ones included, relative ones resolved), so each module can be read, tested and moved on its own."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = "distill_ray"

# Cycles known when this test landed, expected until their fix is in (any other cycle, or one of
# these grown by another module, fails the test; a fixed one must leave the list). Empty it; never add.
KNOWN_CYCLES: list[frozenset[str]] = []


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (`from x import y` counts as
    importing x.y when x.y is a module, else x)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # `import a.b.c` of a name inside a module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> dict[frozenset[str], list[str]]:
    """The strongly connected components of more than one module (Tarjan): each one's modules, with one
    import path around a loop through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return {frozenset(c): _cycle_through(set(c), edges) for c in components}


def _cycle_through(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """One import path from the component's first module back to itself (for the failure message)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(edges[node] & component):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    return sorted(component)


def test_the_package_has_no_import_cycle():
    unexpected = {members: path for members, path in cycles(graph()).items() if members not in KNOWN_CYCLES}
    assert not unexpected, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(path)}  (modules in the loop: {', '.join(sorted(members))})"
        for members, path in unexpected.items())


def test_the_walk_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    """The checker itself: a cycle hidden in a function body, written as a relative import, is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    known = {"pkg": pkg / "__init__.py", "pkg.sub": pkg / "sub" / "__init__.py", "pkg.a": pkg / "a.py",
             "pkg.sub.b": pkg / "sub" / "b.py"}
    edges = {name: imports_of(name, path, known) for name, path in known.items()}
    assert edges["pkg.sub.b"] == {"pkg.a"} and edges["pkg.a"] == {"pkg.sub.b"}
    assert cycles(edges) == {frozenset({"pkg.a", "pkg.sub.b"}): ["pkg.a", "pkg.sub.b", "pkg.a"]}


def test_known_cycles_are_still_cycles():
    """A fixed cycle must leave KNOWN_CYCLES (the list only shrinks)."""
    found = cycles(graph())
    assert all(known in found for known in KNOWN_CYCLES), [sorted(k) for k in KNOWN_CYCLES if k not in found]
