"""No import cycles inside `gateway/` (STYLE: "import circles: a shared writer or an injected callback breaks them").

Every import counts, wherever it is written: at the top, inside a function, or under
`if TYPE_CHECKING:`. A lazy or type-only import hides a circle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path, package: str = "gateway") -> dict[str, Path]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path, package: str = "gateway") -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (a name resolves to the longest module it names)."""
    mods = modules(root, package)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                deps.update(owner(f"{module}.{alias.name}") for alias in node.names)  # a submodule or a name
        graph[name] = {dep for dep in deps if dep is not None and dep != name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> Iterator[None]:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                yield from visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
        yield

    for v in sorted(graph):
        if v not in index:
            for _ in visit(v):
                pass
    return sorted(found)


def describe(graph: Mapping[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & inside))}" for m in component)


def test_no_import_cycles_inside_the_gateway() -> None:
    graph = import_graph(ROOT)
    assert "gateway.environments.api" in graph and "gateway.runner" in graph  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


CONTROL = {"gateway.environments." + m for m in ("control", "api", "promotion", "writer")}


def test_the_data_plane_never_reaches_the_control_plane() -> None:
    graph = import_graph(ROOT)
    data = [m for m in graph if m.split(".")[1:2] in (["http"], ["grpc"], ["routing"], ["upstream"])]
    assert data
    assert {m: sorted(reachable(graph, m) & CONTROL) for m in data if reachable(graph, m) & CONTROL} == {}
    # The admin API and the promotion runner share the writer instead of reaching into each other.
    assert "gateway.environments.api" not in reachable(graph, "gateway.environments.promotion")
    assert "gateway.environments.promotion" not in reachable(graph, "gateway.environments.writer")


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "gateway" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"__init__.py": "", "a.py": "import gateway.b\n", "b.py": "from gateway import a\n"},
            [["gateway.a", "gateway.b"]],
        ),
        (  # a type-only import and a function-local one still close a circle
            {
                "__init__.py": "",
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.b import B\n",
                "b.py": "def f():\n    from gateway.c import C\n",
                "c.py": "from .a import A\n",
            },
            [["gateway.a", "gateway.b", "gateway.c"]],
        ),
        (  # relative imports from a package's __init__, and a name that is not a module
            {"__init__.py": "", "p/__init__.py": "from .q import x\n", "p/q.py": "from gateway.p import y\n"},
            [["gateway.p", "gateway.p.q"]],
        ),
        ({"__init__.py": "", "a.py": "import gateway.b\nimport os\n", "b.py": "import json\n"}, []),
    ],
)
def test_the_check_finds_a_cycle(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    assert cycles(import_graph(_package(tmp_path, files))) == expected
