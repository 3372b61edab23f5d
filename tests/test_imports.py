"""The import graph of carclf/ and sweeps/ has no cycle.

    python tests/test_imports.py          # prints every module's imports and the cycle, if any

The graph holds the imports Python runs when a module is imported: those at module level and in
class bodies, not those inside functions (run later, when the function is called) nor those under
`if TYPE_CHECKING:`. An edge goes to the module named: `from carclf import paths` is an edge to
carclf.paths, `from carclf.report import build_report` one to the package carclf.report.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("carclf", "sweeps")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of PACKAGES (a package is its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _runs_at_import(tree: ast.Module):
    """The import statements executed when the module is imported (function bodies are skipped)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports when it is imported."""
    files = module_names(root)
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = set()
        for node in _runs_at_import(tree):
            edges |= _targets(node, module, path.name == "__init__.py", known)
        graph[module] = {t for t in edges if t in known and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search; grey = on the current path)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "black"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_carclf_and_sweeps_import_no_cycle():
    graph = import_graph()
    assert {"carclf.config", "carclf.models", "sweeps.runner"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_config_and_models_no_longer_import_each_other():
    graph = import_graph()
    assert "carclf.config" not in graph["carclf.models"]  # ConfigError comes from carclf.errors
    assert "carclf.models" not in graph["carclf.config"]  # the model-name check imports the zoo when it runs
    assert "carclf.errors" in graph["carclf.models"]


def test_find_cycle_finds_a_cycle_and_the_graph_sees_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    pkg = tmp_path / "carclf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from carclf import b\n\ndef later():\n    from carclf import c\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("import carclf.a\nthing = 1\n")
    graph = import_graph(tmp_path)
    assert graph["carclf.a"] == {"carclf.b"} and graph["carclf.b"] == {"carclf.c"}
    assert find_cycle(graph) == ["carclf.a", "carclf.b", "carclf.c", "carclf.a"]


if __name__ == "__main__":
    graph = import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module])) or '-'}")
    cycle = find_cycle(graph)
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} imports; "
          + (f"CYCLE: {' -> '.join(cycle)}" if cycle else "no cycle"))
    sys.exit(1 if cycle else 0)
