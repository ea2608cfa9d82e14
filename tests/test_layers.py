"""The package's dependency rule, read from the imports (ast) of every module under harvester/.

    cli -> api -> operations -> engine -> (source protocol, store, events)

* no import circle, through any kind of import (top level, inside a function, under
  ``TYPE_CHECKING``), so none needs hiding;
* the sources and the store never import each other, nor one archive's source another's; the
  engine imports the ``Source`` protocol, never a concrete source; nothing imports the CLI
  (``__main__`` runs it); the server never imports the harvester's client side;
* the leaves import no other harvester module than the leaves;
* no ``TYPE_CHECKING`` block, and function-local imports of the package only where the module
  says why (``LAZY``: start-up cost, not a circle).

A temporary exception is listed in ``EXEMPT`` with its reason, never silently.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "harvester"

LEAVES = {"harvester.errors", "harvester.redact", "harvester.units", "harvester.dates", "harvester.config",
          "harvester.containment", "harvester.models", "harvester.rate",
          "harvester.concurrency"}
#: the store: layout, the streaming sink, state, the manifest reader, the tree operations
STORE = ("harvester.store",)
SOURCES = ("harvester.source",)
#: the modules a concrete source is not: the seam itself and the HTTP plumbing every source shares
SOURCE_SHARED = {"harvester.source", "harvester.source.base", "harvester.source.http"}
#: above the engine, in order; a module imports only those after it (and the engine none of them)
UPPER = ["harvester.cli", "harvester.api", "harvester.cluster", "harvester.operations"]

#: modules whose function-local imports of the package are deliberate (not a circle's)
LAZY = {
    "harvester.cli": "each command imports what it runs, so `harvester --help` starts fast",
    "harvester.demo": "the synthetic archive and its server only when a demo runs",
    "harvester.server.serve": "pydicom (through the synthetic archive) only when one is built",
}
#: (importer prefix, imported prefix): why the edge is allowed for now
EXEMPT = {
    ("harvester.source.auto", "harvester.source.nbia"):
        "source auto routes each series to NBIA or IDC (as rclone's union backend routes between remotes): "
        "the one module that knows two archives",
    ("harvester.source.auto", "harvester.source.idc"):
        "source auto routes each series to NBIA or IDC: the one module that knows two archives",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def resolve(importer: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The harvester modules an import statement loads (``from harvester.x import y`` loads
    ``harvester.x.y`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "harvester"]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != "harvester":
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


class Imports(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool) -> None:
        self.name, self.is_package = name, is_package
        self.edges: set[str] = set()
        self.local: list[tuple[int, str]] = []
        self.type_checking: list[int] = []
        self._depth = 0

    def _imp(self, node: ast.Import | ast.ImportFrom) -> None:
        targets = resolve(self.name, node, self.is_package)
        self.edges.update(t for t in targets if t != self.name)
        if self._depth and targets:
            self.local.extend((node.lineno, t) for t in targets)

    visit_Import = visit_ImportFrom = _imp  # noqa: N815

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function  # noqa: N815

    def visit_If(self, node: ast.If) -> None:  # noqa: N802
        if "TYPE_CHECKING" in ast.dump(node.test):
            self.type_checking.append(node.lineno)
        self.generic_visit(node)


def read_graph() -> dict[str, Imports]:
    graph = {}
    for name, path in MODULES.items():
        visitor = Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph[name] = visitor
    return graph


GRAPH = read_graph()


def within(name: str, prefixes: tuple[str, ...] | list[str] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def exempt(importer: str, imported: str) -> bool:
    return any(within(importer, (a,)) and within(imported, (b,)) for a, b in EXEMPT)


def edges() -> list[tuple[str, str]]:
    return sorted((a, b) for a, v in GRAPH.items() for b in v.edges if b in MODULES)


def circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v].edges):
            if w not in GRAPH or within(v, (w,)):
                continue  # a module importing its own package's __init__ is Python's order, not a circle
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


# ---------------------------------------------------------------- the rules

def test_the_graph_is_read_at_all() -> None:
    """The reader sees the edges it must judge (a broken reader would pass every rule)."""
    all_edges = set(edges())
    assert ("harvester.engine", "harvester.source.base") in all_edges
    assert ("harvester.api", "harvester.operations") in all_edges
    assert ("harvester.source.nbia.source", "harvester.source.nbia.planner") in all_edges
    assert len(MODULES) > 40


def test_no_import_circle() -> None:
    assert circles() == []


def test_a_circle_would_be_found() -> None:
    """The circle finder itself: a two-module circle added to the graph is reported."""
    GRAPH["harvester.models"].edges.add("harvester.engine")
    try:
        assert any({"harvester.models", "harvester.engine"} <= set(c) for c in circles())
    finally:
        GRAPH["harvester.models"].edges.discard("harvester.engine")


def concrete_source(name: str) -> str:
    """``harvester.source.nbia`` for ``harvester.source.nbia.planner``."""
    return ".".join(name.split(".")[:3])


def forbidden(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None when it may."""
    if imported == "harvester.cli" and importer != "harvester.__main__":
        return "nothing imports the CLI"
    if within(importer, LEAVES) and not within(imported, LEAVES):
        return "a leaf imports only leaves"
    if within(importer, SOURCES) and within(imported, STORE):
        return "a source never imports the store"
    if within(importer, STORE) and within(imported, SOURCES):
        return "the store never imports a source"
    if (within(importer, SOURCES) and within(imported, SOURCES) and SOURCE_SHARED.isdisjoint({importer, imported})
            and concrete_source(importer) != concrete_source(imported)):
        return "one archive's source never imports another's (what they share is in selection or source.http)"
    if importer == "harvester.engine" and within(imported, SOURCES) and imported not in SOURCE_SHARED:
        return "the engine drives the Source protocol, never a concrete source"
    if within(importer, ("harvester.server",)) and not within(imported, ("harvester.server",)) and (
            within(imported, UPPER) or imported == "harvester.engine" or within(imported, SOURCES)):
        return "the server is the archive's side: it never imports the harvester's client side"
    for rank, upper in enumerate(UPPER):
        if imported == upper:
            allowed = UPPER[:rank] + ["harvester", "harvester.__main__"]
            if importer not in allowed:
                return f"only {', '.join(UPPER[:rank]) or 'the package'} may import {upper}"
    if imported == "harvester.engine" and (within(importer, SOURCES) or within(importer, STORE)):
        return "sources and the store sit below the engine"
    return None


def test_no_forbidden_edge() -> None:
    bad = [f"{a} -> {b}: {why}" for a, b in edges() if (why := forbidden(a, b)) and not exempt(a, b)]
    assert bad == []


def test_the_rules_catch_what_they_name() -> None:
    """Each rule refuses its edge (a rule that refuses nothing cannot fail)."""
    assert forbidden("harvester.source.nbia.source", "harvester.store.manifest")
    assert forbidden("harvester.store.manifest", "harvester.source.http")
    assert forbidden("harvester.engine", "harvester.source.nbia")
    assert forbidden("harvester.source.dicomweb.source", "harvester.source.nbia.planner")
    assert forbidden("harvester.source.nbia.source", "harvester.source.nbia.client") is None
    assert forbidden("harvester.api", "harvester.cli")
    assert forbidden("harvester.server.app", "harvester.cli")
    assert forbidden("harvester.server.archive", "harvester.operations")
    assert forbidden("harvester.engine", "harvester.operations")
    assert forbidden("harvester.operations", "harvester.api")
    assert forbidden("harvester.models", "harvester.query")
    assert forbidden("harvester.engine", "harvester.source.base") is None
    assert forbidden("harvester.operations", "harvester.source.dicomweb") is None


def test_every_exemption_is_still_needed() -> None:
    """An exemption whose edge is gone is removed, so the list says what is still owed."""
    used = {(a, b) for a, b in EXEMPT if any(within(x, (a,)) and within(y, (b,)) for x, y in edges())}
    assert used == set(EXEMPT)


def test_no_type_checking_block() -> None:
    """A ``TYPE_CHECKING`` import exists only to hide a circle; shared types live in leaves."""
    assert {n: v.type_checking for n, v in GRAPH.items() if v.type_checking} == {}


def test_function_local_imports_only_where_the_module_says_why() -> None:
    local = {n: v.local for n, v in GRAPH.items() if v.local and n not in LAZY}
    assert local == {}


@pytest.mark.parametrize("name", sorted(LAZY))
def test_each_lazy_module_still_imports_lazily(name: str) -> None:
    assert GRAPH[name].local, f"{name} has no function-local import any more: remove it from LAZY"
