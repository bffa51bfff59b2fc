"""No import circles in the server, the gateway or the firmware.

The graph is read from the source (the AST), never by importing it, so a circle
that only bites in one order of imports is found all the same. Every import
statement counts, wherever it stands: at module level, inside a function, under
`if TYPE_CHECKING:`. An import moved into a function is how a circle is usually
hidden (the three that issue 12 named all were: `openapi` <-> `alarms.openapi`,
`api.keys` <-> `status.health`, `sense.tls` <-> `sense.net`); it still means two
modules that each need the other.

Nodes are modules (a package is its `__init__`); `from pkg import name` points at
`pkg.name` when that is a module, else at `pkg`. The implicit import of a parent
package (importing `a.b.c` runs `a/__init__`) is not an edge: a package's
`__init__` may import its own parts (a feature's `setup(app)`) without a circle.
Only imports between the programs' own modules are edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (directory holding top-level packages/modules, which of them are ours); the
# gateway's opensense_contract is a link to the server's, read once
SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("server", ("opensense", "opensense_contract")),
    ("gateway", ("opensense_gateway",)),
    ("firmware", ("sense", "hw", "main", "selftest")),
)


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    out: dict[str, tuple[Path, bool]] = {}
    for base, tops in SOURCES:
        for top in tops:
            single = root / base / f"{top}.py"
            if single.is_file():
                out[top] = (single, False)
                continue
            for f in sorted((root / base / top).rglob("*.py")):
                parts = f.relative_to(root / base).with_suffix("").parts
                is_pkg = parts[-1] == "__init__"
                name = ".".join(parts[:-1] if is_pkg else parts)
                out[name] = (f, is_pkg)
    return out


def _imports(tree: ast.AST, name: str, is_pkg: bool, known: set[str]) -> Iterator[str]:
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(tree):  # every statement: module level, functions, TYPE_CHECKING
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield sub
                elif base in known:
                    yield base


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    out: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        out[name] = {m for m in _imports(tree, name, is_pkg, known) if m != name}
    return out


def _components(g: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return comps


def _shortest_back(g: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """The shortest way from start back to start inside its component (breadth first)."""
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(g[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        todo = nxt
    raise AssertionError(f"{start} is in a component but on no circle")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The shortest circle through each module that is on one, each circle once, as
    the path a -> b -> ... -> a starting at its smallest name."""
    out: set[tuple[str, ...]] = set()
    for comp in _components(g):
        for start in comp:
            c = _shortest_back(g, comp, start)[:-1]
            k = c.index(min(c))
            c = c[k:] + c[:k]
            out.add((*c, c[0]))
    return sorted(list(c) for c in out)


def test_the_graph_sees_every_program() -> None:
    g = graph()
    # a wrong root or a wrong resolution of relative imports would pass the cycle test
    # with an empty graph
    assert {"opensense.app", "opensense_contract.rules", "opensense_gateway.main"} <= set(g)
    assert {"sense.node", "sense.tls", "hw.sim", "main"} <= set(g)
    assert "opensense.api.keys" in g["opensense.api.middleware"]
    assert "opensense_contract.rules" in g["opensense_gateway.rules"]
    assert "sense.net" in g["sense.tls"]  # a function-level import counts


def test_a_circle_is_found_and_shown() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(g) == [["a", "b", "c", "a"]]
    # two circles through one module (openapi <-> alarms.openapi, openapi <-> status.apidoc)
    g = {"x": {"y"}, "y": {"x", "z"}, "z": {"y"}, "w": {"x"}}
    assert cycles(g) == [["x", "y", "x"], ["y", "z", "y"]]


def test_no_import_circles() -> None:
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)
