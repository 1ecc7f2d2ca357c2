"""The import rule of docs/ARCHITECTURE.md, checked on the source."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "streaming": {"pipelines", "server", "client"},
    "pipelines": {"server", "client", "aiortc", "av", "aiohttp", "aiomqtt"},
    "client": {"server", "pipelines"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_imports_point_one_way() -> None:
    bad = []
    checked = 0
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            checked += 1
            hits = imported_roots(path) & forbidden
            if hits:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert checked > 10
    assert bad == []


# ---- no import cycles -------------------------------------------------------------------------

OWN = ("server", "client", "pipelines", "streaming")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the repository's own modules it imports: at module level or inside a
    function, under TYPE_CHECKING too. Importing ``a.b.c`` (or ``from a.b import c``) runs
    ``a`` and ``a.b`` as well, so those count."""
    files = {module_name(p): p for package in OWN for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        deps = set()
        for target in targets:
            parts = target.split(".")
            deps |= {m for k in range(1, len(parts) + 1) if (m := ".".join(parts[:k])) in files}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "client.common.eventlog" in graph["client.common.reconnect"]  # module level
    assert "client.desktop.window" in graph["client.desktop.main"]  # inside run_window
    assert "client.common.eventlog" in graph["server.cli"]  # under TYPE_CHECKING
    assert "client.common" in graph["client.common.ws_client"]  # the package runs too


def test_no_module_imports_itself_round_a_cycle() -> None:
    """Nowhere (the desktop app and its window never import each other, nor the access rules
    and the settings), and the shared client library (client/common) imports no app package."""
    graph = import_graph()
    assert cycles(graph) == []
    common = {m: sorted(d for d in deps if d.startswith(("client.speaker", "client.desktop")))
              for m, deps in graph.items() if m.startswith("client.common")}
    assert {m: d for m, d in common.items() if d} == {}
