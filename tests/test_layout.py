"""The package's three layers, read from the source: the library (losses, functional, ops, backend, kernels,
integrations) never imports the distillation application (``ibkd.distill``), which never imports the
experiments (``ibkd.experiments``); no module imports itself back through others; no module is large.
``ibkd.cli`` is the command-line router above all three and may import any of them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ibkd"
MAX_LINES = 550  # "about 500": a module past this holds more than one job


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def _imports(name: str, path: Path, known: set) -> set:
    """ibkd modules imported by ``name`` (absolute or relative, at any depth of the file)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("ibkd") and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int:
    if name == "ibkd.cli" or name == "ibkd.__main__":
        return 3
    if name.startswith("ibkd.experiments"):
        return 2
    if name.startswith("ibkd.distill"):
        return 1
    return 0


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_a_lower_layer_never_imports_a_higher_one(graph):
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if _layer(b) > _layer(a) and b != "ibkd")
    assert not upward, upward


def test_no_import_circles(graph):
    # package __init__ files re-export their children, which import the package back: only module-to-module
    # edges between non-package modules count
    edges = {a: {b for b in deps if b in graph and not b.endswith("__init__")} for a, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt in (node.rpartition(".")[0],) or node.startswith(nxt + "."):
                continue  # a module importing its own package (the package's __init__)
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, cycles


def test_no_module_is_large():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_the_triton_kernels_live_inside_the_package():
    assert (PACKAGE / "kernels" / "infonce.py").is_file() and (PACKAGE / "kernels" / "hsic.py").is_file()
    assert not (PACKAGE.parent / "kernels").exists()
