"""The package's layout rules, read from the source: short functions, module-level imports of our own modules, no
import cycles, and stages that import only from below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "unidetox"
MAX_FUNCTION_LINES = 80
# Low to high: a module may import from its own level and below. The entry points (CLI, package exports) sit on top.
STAGE_LEVELS = {"decoding": 1, "evaluation": 2, "lm_eval_tasks": 2, "distill": 3, "detox": 4, "replication": 5}
TOP_LEVEL_MODULES = {"unidetox", "unidetox.cli", "unidetox.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _level(module: str) -> int:
    if module in TOP_LEVEL_MODULES:
        return 99
    parts = module.split(".")
    return STAGE_LEVELS.get(parts[1], 0) if len(parts) > 2 or parts[1] in STAGE_LEVELS else 0


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The unidetox modules an import statement loads (``from a import b`` loads ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "unidetox"]
    base = node.module or ""
    if node.level:
        package = module.split(".") if module in MODULES and _is_package(module) else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    if base.split(".")[0] != "unidetox":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads: top-level ones and those under a top-level ``try``/``if`` (but not
    ``if TYPE_CHECKING:``, which never runs)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.Try, ast.If)):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i for node in _module_level_imports(t) for i in _imported(node, m) if i != m} for m, t in MODULES.items()}


def test_no_function_is_over_80_lines():
    long = [f"{m}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for m, t in MODULES.items() for n in ast.walk(t)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_our_modules_are_imported_at_module_level():
    local = []
    for module, tree in MODULES.items():
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            local += [f"{module}:{node.lineno} in {function.name}" for node in ast.walk(function)
                      if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(node, module)]
    assert not local, "move these imports of unidetox modules to the top of their module:\n" + "\n".join(local)


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_stages_import_only_from_below():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in sorted(targets) if _level(t) > _level(m)]
    assert not upward, "a lower stage imports a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, expected", [("unidetox.files", 0), ("unidetox.decoding.fused", 1),
                                              ("unidetox.evaluation.harness", 2), ("unidetox.detox", 4),
                                              ("unidetox.cli", 99)])
def test_levels_are_read_from_the_package_path(module, expected):
    assert _level(module) == expected
