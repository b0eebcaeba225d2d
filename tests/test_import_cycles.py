"""No import cycles between the package's modules (lazy, function-level imports included).

A cycle makes import order matter and hides which module is the lower layer; the shared
piece belongs in a module both can import. The graph comes from grimp (import-linter's
engine); the strongly connected components of "module imports module" must be single
modules, except for the pairs listed in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")

# {frozenset of a cycle's modules: why it is tolerated for now}; keep this empty if you can
ALLOWED: dict[frozenset[str], str] = {}


def _cycles(graph) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def _chain(graph, a: str, b: str) -> str:
    there = graph.find_shortest_chain(importer=a, imported=b) or ()
    back = graph.find_shortest_chain(importer=b, imported=a) or ()
    return f"{' -> '.join(there)} | {' -> '.join(back)}"


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.b", imported="p.c")
    assert _cycles(graph) == [frozenset({"p.a", "p.b"})]


def test_no_import_cycles():
    graph = grimp.build_graph("pivotmerge_gui", cache_dir=None)
    found = _cycles(graph)
    unexpected = [c for c in found if c not in ALLOWED]
    details = [
        f"{sorted(c)}: {_chain(graph, *sorted(c)[:2])}" for c in unexpected
    ]
    assert not unexpected, "import cycles:\n" + "\n".join(details)
    stale = [sorted(c) for c in ALLOWED if c not in found]
    assert not stale, f"allowed cycles that no longer exist (remove them from ALLOWED): {stale}"
