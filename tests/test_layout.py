"""The package's layout holds: no import circle among ddpm's modules (function-level imports
counted), every function-level import says why it is not at the top, no function over 60 lines and
no module over 650. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "ddpm"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 650


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> list[tuple[str, ast.AST]]:
    """(ddpm module, import node) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node))
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: {target for target, _ in imported_modules(name, path, known)} for name, path in modules().items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_ddpm_modules():
    assert circles(import_graph()) == []


def function_level_imports(path: Path) -> list[ast.AST]:
    tree = ast.parse(path.read_text())
    found = []
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [node for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return found


def test_every_function_level_import_says_why():
    """Imports inside functions stay only where they keep ``ddpm --help`` fast or an optional
    dependency optional; each says so in a comment on its line or the line above."""
    missing = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in function_level_imports(path):
            here = lines[node.lineno - 1: node.end_lineno]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if not any("#" in line for line in here) and not above.startswith("#"):
                missing.append(f"{name}:{node.lineno}")
    assert missing == []


def test_no_function_over_60_lines():
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({length})")
    assert long_functions == []


def test_no_module_over_650_lines():
    long_modules = [name for name, path in modules().items() if len(path.read_text().splitlines()) > MAX_MODULE_LINES]
    assert long_modules == []


if __name__ == "__main__":      # a report of the current state, for reading
    print("circles:", circles(import_graph()))
    for test in (test_every_function_level_import_says_why, test_no_function_over_60_lines, test_no_module_over_650_lines):
        try:
            test()
        except AssertionError as exc:
            print(test.__name__, str(exc)[:3000])
