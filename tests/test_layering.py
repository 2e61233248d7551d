"""The import structure: no cycles, and the core layers never reach up.

Imports are read from the source (module-level and the lazy ones inside functions alike), so
a cycle cannot hide behind a function-level import."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPPER = (
    "zsq_plugins.api",
    "zsq_plugins.cli",
    "zsq_plugins.compare",
    "zsq_plugins.quantize_command",
    "zsq_plugins.zoo",
    "zsq_plugins.adapters",
)
"""What the core must not import: the top-level API, the command line, comparisons, the model
zoo and the toolkit adapters (which plug in through entry points)."""
CORE = (
    "zsq_plugins.synthesis",
    "zsq_plugins.reconstruction",
    "zsq_plugins.quant",
    "zsq_plugins.datasets",
    "zsq_plugins.adapter",
    "zsq_plugins.budgets",
    "zsq_plugins.capture",
    "zsq_plugins.checksums",
    "zsq_plugins.configio",
    "zsq_plugins.errors",
    "zsq_plugins.evaluation",
    "zsq_plugins.grid_order",
    "zsq_plugins.input_spec",
    "zsq_plugins.layers",
    "zsq_plugins.onnx_calibration",
    "zsq_plugins.phases",
    "zsq_plugins.plots",
    "zsq_plugins.registry",
    "zsq_plugins.reporting",
    "zsq_plugins.spec",
)


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "adapters":  # installed as zsq_plugins.adapters
        parts = ["zsq_plugins", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = [*(ROOT / "zsq_plugins").rglob("*.py"), *(ROOT / "adapters").glob("*.py")]
    modules = {_module_name(path): path for path in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package that
    re-exports its submodules is not a cycle with them: edges from a package's ``__init__``
    to its own submodules are left out."""
    edges = {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for name in edges:
        if name not in index:
            visit(name)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_core_never_imports_the_layers_above_it():
    graph = import_graph()
    upward = {
        name: sorted(t for t in targets if _within(t, UPPER))
        for name, targets in graph.items()
        if _within(name, CORE)
    }
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_the_checks_see_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    assert "zsq_plugins.api" in real["zsq_plugins"]  # the graph reads real imports
    assert _within("zsq_plugins.compare.runner", UPPER)
