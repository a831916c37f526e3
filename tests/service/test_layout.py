"""The shape of ``service/``, read statically from its import statements (``ast``, every import,
function-local and ``TYPE_CHECKING`` ones included): no import cycle; FastAPI and Starlette only
inside ``service/api/``; the worker reaches neither; the client reaches no third-party package but
its four; and every file opens with a docstring."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "service"
WEB = {"fastapi", "starlette"}
CLIENT_DEPS = {"httpx", "numpy", "safetensors", "orjson"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: Iterable[str]) -> set[str]:
    """Every module ``path`` imports: ours by full name, others by their top-level name."""
    known = set(known)
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name if alias.name in known else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "service":
                found.add(base.split(".")[0])
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, mods) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue  # not ours
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not (ours and the top-level others)."""
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        for w in edges.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "service.training.runner" in edges["service.training.worker"]  # from . import runner
    assert "service.inference.protocol" in edges["service.api.errors"]  # from ..x.y import z
    assert "service.settings" in edges["service.cli.common"]  # inside TYPE_CHECKING
    assert "uvicorn" in edges["service.cli.serve"]  # inside a function


def test_service_has_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_only_the_api_imports_fastapi_or_starlette() -> None:
    offenders = {name: sorted(deps & WEB) for name, deps in graph().items()
                 if deps & WEB and not name.startswith("service.api")}
    assert offenders == {}


@pytest.mark.parametrize("module", ["service.training.worker", "service.training.supervisor",
                                    "service.training", "service.inference"])
def test_domain_code_reaches_no_web_framework(module: str) -> None:
    reached = reach(graph(), module)
    assert not reached & WEB, sorted(reached & WEB)
    assert not {m for m in reached if m.startswith("service.api")}


def test_the_client_reaches_only_its_own_dependencies() -> None:
    reached = reach(graph(), "service.client")
    ours = {m for m in reached if m.startswith("service")}
    assert ours <= {"service.wire"}, ours
    third_party = {m for m in reached - ours if m not in sys.stdlib_module_names}
    assert third_party <= CLIENT_DEPS, third_party


def test_every_file_says_what_it_holds() -> None:
    missing = [name for name, path in modules().items()
               if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []
