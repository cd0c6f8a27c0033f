"""The package's import graph has no cycle, counting imports inside functions too: a function-level
import may defer a heavy module (the CLI's fast answers), never hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cleantune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def import_graph() -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported(node):
                while target and target not in modules:  # `from pkg.mod import name` names pkg.mod
                    target = target.rpartition(".")[0]
                # Importing pkg.sub runs pkg/__init__ too, unless the importer lives in pkg itself.
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step != name and not name.startswith(step + "."):
                        graph.add_edge(name, step)
    return graph


def test_the_import_graph_has_no_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert graph.has_edge("cleantune.cli", "cleantune.dispatch")  # imported inside a command
    assert graph.has_edge("cleantune.defenses.base", "cleantune.training")
    assert not graph.has_edge("cleantune.training", "cleantune.defenses.base")
