"""The code layout's rules (README "How the code is laid out"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
LONG_OK = "Long because"  # a function over the limit says why in its docstring


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_library_never_imports_the_orchestrator_or_the_application() -> None:
    offenders = {name: sorted(i for i in _imports(path) if i.split(".")[0] in {"prefect", "flows"})
                 for name, path in _modules("cxr_core").items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_in_the_library_or_the_application() -> None:
    for package in ("cxr_core", "flows"):
        modules = _modules(package)
        graph = {name: {i for i in _imports(path) if i in modules and i != name}
                 for name, path in modules.items()}
        assert _cycle(graph) is None, f"import cycle in {package}: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_over_80_lines_without_a_reason() -> None:
    long = []
    for package in ("cxr_core", "flows"):
        for name, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES and LONG_OK not in (ast.get_docstring(node) or ""):
                        long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_mlflow_folder_never_shadows_the_mlflow_package() -> None:
    assert not (REPO / "mlflow" / "__init__.py").exists()
