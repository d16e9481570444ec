"""The budgets ARCHITECTURE.md sets for bnaudit/: module and function size, parameters, imports, repetition."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bnaudit"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
MAX_PUBLIC_PARAMETERS = 6


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


def _is_public(fn: ast.FunctionDef | ast.AsyncFunctionDef, path: Path) -> bool:
    return not fn.name.startswith("_") and not any(p.startswith("_") for p in path.stem.split("."))


def test_modules_are_small() -> None:
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}


def test_functions_are_small() -> None:
    long = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({length} lines)")
    assert long == []


def test_public_functions_take_few_parameters() -> None:
    wide = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            if _is_public(fn, path) and (n := _parameter_count(fn)) > MAX_PUBLIC_PARAMETERS:
                wide.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({n} parameters)")
    assert wide == []


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """bnaudit modules imported when ``module`` is imported (not those imported inside functions)."""
    found: set[str] = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node] if not isinstance(node, (ast.If, ast.Try)) else ast.walk(node):
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("bnaudit")}
            elif isinstance(sub, ast.ImportFrom):
                target = sub.module or ""
                if sub.level:
                    target = ".".join(base[: len(base) - sub.level + 1] + ([target] if target else []))
                if target.startswith("bnaudit"):
                    found.add(target)
                    found |= {f"{target}.{a.name}" for a in sub.names}
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in _modules()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name, path.stem == "__init__")
        edges = {m for m in imported if m in modules and m != name}
        # importing a.b.c imports its packages a.b and a first
        edges |= {".".join(m.split(".")[:i]) for m in edges for i in range(1, m.count(".") + 1)}
        graph[name] = {m for m in edges if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    assert _find_cycle(_import_graph()) is None


# ARCHITECTURE.md's layers, lowest first: a module imports only from its own layer and those below it.
LAYERS = ("base", "checkpoint", "report", "bn", "live", "audit", "repair", "cli")


def _layer(module: str) -> int:
    name = module.split(".")[1] if "." in module else ""
    return LAYERS.index(name) if name in LAYERS else 0  # errors, defaults, config, ...: the base


def test_layer_of_a_module() -> None:
    assert [_layer(m) for m in ("bnaudit.errors", "bnaudit.checkpoint", "bnaudit.cli.options")] == [0, 1, 7]


def test_imports_flow_downward_only() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _import_graph().items()
        for target in targets
        if module not in ("bnaudit", "bnaudit.__main__") and _layer(target) > _layer(module)
    )
    assert upward == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the duplicates command is not installed")
def test_no_repeated_blocks() -> None:
    out = subprocess.run(
        ["duplicates", "--repo", str(PACKAGE), "--seconds", "60"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("no duplicates"), out
