"""The layout's rules, checked on the source: no import circle, patches/ stands alone, the engine does not lean on
the HTTP layer, server/ does not lean on clients/, and no file outgrows one concept."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "patches", "clients")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at import time only, or anywhere in its code)."""
    known = modules()
    graph = {name: set() for name in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            targets = [t.removeprefix("longserve.") for t in targets]  # the folders install as longserve.<folder>
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def test_no_import_circle():
    graph = import_graph(top_level_only=True)
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import circle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_engine_imports_nothing_from_the_http_layer():
    """server/engine/ takes what it needs as arguments; besides itself it uses only helpers that stand alone too."""
    alone = ("server.engine", "server.log_ids", "server.extensions.schema_keywords", "server.extensions.guidance")
    graph = import_graph(top_level_only=False)
    leaning = {(m, t) for m in graph if m.startswith(alone) for t in graph[m]
               if t.startswith("server") and not t.startswith(alone) and t != "server.extensions"}
    assert leaning == set()


def test_patches_stand_alone_and_only_the_cli_dispatches_to_clients():
    graph = import_graph(top_level_only=False)
    assert [(m, t) for m in graph if m.startswith("patches") for t in graph[m] if not t.startswith("patches")] == []
    leaning = {m for m in graph if m.startswith("server") for t in graph[m] if t.startswith("clients")}
    assert leaning <= {"server.cli"}


def test_no_file_over_the_line_limit():
    paths = [p for d in (*PACKAGES, "benchmarks", "tests") for pattern in ("*.py", "*.c", "*.h") for p in (REPO / d).rglob(pattern)]
    long = {str(p.relative_to(REPO)): n for p in paths if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concept: {long}"
