"""The package layers: each package imports only its own modules and the layers below it.

Read from the source, every import counted wherever it is (a function-level import
too) except those under ``if TYPE_CHECKING:``, which never run. The README's layout
table describes the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "curate"

#: Lower imports nothing higher; packages of one layer do not import each other.
LAYERS = [
    ["core"],  # config, registry, recipe, operators, stage base, schema, run-folder layout
    ["io", "text"],  # readers and formats; caption text
    ["download", "clip", "dedup", "demo"],  # crawler; CLIP models; dedup; the demo pool
    ["train"],  # shards, trainer, evaluation, compare
    ["annotators", "filters"],
    ["stages"],  # thin adapters of the libraries below to the recipe
    ["engine"],  # the only door to Ray
    ["runner"],
    ["report"],
    ["walkthrough"],  # curate demo
    ["cli"],
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each ``curate`` import that runs, relative ones resolved."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    me = module_name(path).split(".")
    if path.name != "__init__.py":
        me = me[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = me[: len(me) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # ``from curate.x import y`` may import the module curate.x.y
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "curate"]


def known_module(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of curate's modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> the curate modules it imports, with a line of each."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for module, path in paths.items():
        edges = graph.setdefault(module, {})
        for line, name in runtime_imports(path):
            target = known_module(name, set(paths))
            if target and target != module and target != "curate":
                edges.setdefault(target, line)
    return graph


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in import_graph()} - {None}
    assert packages <= set(RANK), f"packages without a layer: {packages - set(RANK)}"


def test_imports_run_down_the_layers_only():
    wrong = []
    for module, edges in import_graph().items():
        mine = package_of(module)
        for target, line in edges.items():
            theirs = package_of(target)
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                wrong.append(f"{module}:{line} imports {target} ({theirs} is not below {mine})")
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage():
    wrong = [
        f"{module}:{line} imports {target}"
        for module, edges in import_graph().items()
        if module.startswith("curate.stages.")
        for target, line in edges.items()
        if target.startswith("curate.stages.")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, {}):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
