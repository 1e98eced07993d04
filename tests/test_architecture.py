"""The layers of the house: no import circle and no upward import, read from the source itself.

Every import counts, including those inside functions (a lazy import is still a dependency) and
``"package.module:attr"`` strings that are imported by name (the runner's table of loops).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "tasks")

# Bottom to top; a module may import its own layer and those below it, never one above.
LAYERS = {
    "bench.core": 0,  # plumbing
    "methods": 1,
    "tasks": 1,
    "bench.loops": 2,
    "bench.harness": 3,
    "bench.studies": 4,
    "bench.cli": 5,
    "bench": 5,  # the package itself (empty)
}
# Peers that must not know each other: nothing in tasks knows which method runs, and the
# method library stands alone (torch only, plus the generic registry).
SEPARATE = {("methods", "tasks"), ("tasks", "methods")}
METHODS_MAY_IMPORT = {"bench.core.registry"}
METHODS_THIRD_PARTY = {"torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(internal modules imported, top-level names of external modules imported) by one file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] in PACKAGES:
            internal.add(target)
        else:
            external.add(target.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            target = node.value.split(":")[0]
            if target in known:
                add(target)
    return {m for m in internal if m in known} | (internal - known), external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = internal_modules()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(path, name, set(modules))
        graph[name].discard(name)
    return graph, external


def layer_of(module: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        src_group, src_layer = layer_of(src)
        for dst in targets:
            dst_group, dst_layer = layer_of(dst)
            if dst_layer > src_layer or (src_group, dst_group) in SEPARATE:
                bad.append(f"{src} ({src_group}) imports {dst} ({dst_group})")
    return sorted(bad)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checks_catch_a_circle_and_an_upward_import():
    # The checks themselves, on a planted graph: a loop importing the harness, and the six-file
    # circle of the old layout (a task -> the RM loop -> the LM loop and the runner -> tasks).
    planted = {
        "tasks.lexicon": {"bench.loops.reward_model"},
        "bench.loops.reward_model": {"bench.loops.train", "bench.harness.runner"},
        "bench.loops.train": {"bench.harness.runner"},
        "bench.harness.runner": {"tasks"},
        "tasks": {"tasks.lexicon"},
    }
    assert import_cycles(planted) == [sorted(planted)]
    assert import_cycles({**planted, "bench.harness.runner": set()}) == []
    assert upward_imports(planted) == [
        "bench.loops.reward_model (bench.loops) imports bench.harness.runner (bench.harness)",
        "bench.loops.train (bench.loops) imports bench.harness.runner (bench.harness)",
        "tasks.lexicon (tasks) imports bench.loops.reward_model (bench.loops)",
    ]
    assert upward_imports({"methods.objective": {"tasks.mixtures"}}) == [
        "methods.objective (methods) imports tasks.mixtures (tasks)"
    ]


def test_the_parser_sees_lazy_relative_and_by_name_imports(tmp_path):
    src = tmp_path / "tasks" / "demo.py"
    src.parent.mkdir()
    src.write_text(
        "def f():\n    from bench.loops import train\n"
        "from . import mixtures\n"
        "LOOP = 'bench.harness.runner:run_cell'\n"
        "import numpy.linalg\n"
    )
    known = {"bench.loops.train", "bench.harness.runner", "tasks.mixtures", "tasks.demo"}
    internal, external = imports_of(src, "tasks.demo", known)
    assert internal == {"bench.loops.train", "tasks.mixtures", "bench.harness.runner"}
    assert external == {"numpy"}


def test_no_import_circle():
    graph, _ = import_graph()
    assert len(graph) > 40, "the walk found the package's modules"
    assert import_cycles(graph) == []


def test_no_upward_import():
    graph, _ = import_graph()
    assert upward_imports(graph) == []


def test_every_module_has_a_layer():
    for name in internal_modules():
        assert layer_of(name)[0] in LAYERS


@pytest.mark.parametrize("kind", ["bench", "third-party"])
def test_methods_import_nothing_of_bench_or_model_libraries(kind):
    graph, external = import_graph()
    stdlib = set(sys.stdlib_module_names)
    for name in (m for m in graph if layer_of(m)[0] == "methods"):
        if kind == "bench":
            assert {m for m in graph[name] if m.startswith("bench")} <= METHODS_MAY_IMPORT, name
        else:
            assert external[name] - stdlib - {"__future__"} <= METHODS_THIRD_PARTY, name
