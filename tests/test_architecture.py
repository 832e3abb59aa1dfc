"""The shape of the package, checked: imports point one way, modules and functions stay readable.

Imports are read from the source (function-local ones included), so a cycle cannot hide behind a
deferred import.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "arow"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_DEFERRED = 5
#: files of a run folder, spelled only in runs/ (the run and study folders' owner)
RUN_FILE_NAMES = ("final.pt", "last.pt", "best.pt", "metrics.jsonl", "eval.json", "config.json", "diverged.json")


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported arow module, deferred into a function?) for every import of ``path``."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # imports for type checkers only never run
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "arow":
                    for alias in child.names:  # `from . import x` may name a module
                        sub = f"{target}.{alias.name}"
                        found.append((sub if _exists(sub) else target, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "arow")
            visit(child, inner)

    visit(tree, False)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    """Module -> the arow modules it imports. A module's import of its own package (``from arow.models
    import MODELS`` in ``models/resnet.py``) is not an edge: a package's ``__init__`` importing its
    modules so that they register themselves is the registries' design, and runs first."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        graph[mod] = {m for m, _ in _imports(path) if m != mod and not mod.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_few_imports_of_arow_deferred_into_functions():
    deferred = [f"{p.relative_to(SRC)}: {m}" for p in SRC.rglob("*.py") for m, late in _imports(p) if late]
    assert len(deferred) <= MAX_DEFERRED, deferred


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(str(path.relative_to(SRC)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(SRC)}:{node.name}")
    assert long_modules == [] and long_functions == []


def test_run_folder_file_names_are_spelled_in_runs_only():
    outside = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] == "runs":
            continue
        outside += [f"{path.relative_to(SRC)}:{node.lineno} {node.value}" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES]
    assert outside == []
