"""carclf's and sweeps' imports: the import-linter contracts of pyproject.toml hold, and no module imports
itself through others.

    lint-imports                          # the contracts, as CI checks them
    python tests/test_imports.py          # the first import cycle, if any

Both read the import graph grimp builds: every import statement a module holds, at its top or inside a
function, but not those under `if TYPE_CHECKING:` (never run).
"""

from __future__ import annotations

import graphlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("carclf", "sweeps")
CONTRACTS = {"sweeps-above-carclf", "carclf-layers", "sweeps-layers", "no-ray-optuna-in-carclf"}


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports, function-level imports included."""
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)
    inside = {m for m in graph.modules if m.split(".")[0] in packages}
    return {m: graph.find_modules_directly_imported_by(m) & inside - {m} for m in inside}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a] (a imports b, ...), or None."""
    try:  # graphlib reads the mapping as node -> what it needs first: an import is such a need
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))
    return None


def lint_imports(config: Path, cwd: Path, *paths: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on `config`, in its own process (its logging setup would silence this session's loggers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "--config", str(config), "--no-cache"], capture_output=True, text=True, cwd=cwd, env=env)


def _package(root: Path, name: str, modules: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, text in modules.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(text))


def test_the_import_contracts_hold():
    named = {c["id"] for c in read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"]}
    assert CONTRACTS <= named  # a contract taken out of pyproject.toml fails here, not silently
    done = lint_imports(ROOT / "pyproject.toml", ROOT, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(named)} kept, 0 broken" in done.stdout


def test_a_layer_that_imports_upwards_inside_a_function_breaks_the_contract(tmp_path):
    _package(tmp_path, "layered", {"high": "def run():\n    return 1\n",
                                   "low": "def helper():\n    from layered.high import run\n    return run()\n"})
    (tmp_path / "contracts.toml").write_text(textwrap.dedent("""\
        [tool.importlinter]
        root_package = "layered"

        [[tool.importlinter.contracts]]
        name = "high above low"
        type = "layers"
        containers = ["layered"]
        layers = ["high", "low"]
        """))
    done = lint_imports(tmp_path / "contracts.toml", tmp_path, tmp_path)
    assert done.returncode == 1 and "layered.low -> layered.high" in done.stdout, done.stdout + done.stderr


def test_no_import_cycle_among_carclf_and_sweeps_modules():
    graph = import_graph(*PACKAGES)
    assert {"carclf.config", "carclf.models.registry", "sweeps.run.runner"} <= set(graph)
    assert graph["carclf.config"] >= {"carclf.models.registry", "carclf.models.finetune"}  # imports seen
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_a_cycle_made_by_a_function_level_import(tmp_path, monkeypatch):
    _package(tmp_path, "circle", {"a": "from circle import b\n",
                                  "b": "def later():\n    from circle import c\n",
                                  "c": "import circle.a\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = import_graph("circle")
    assert graph["circle.b"] == {"circle.c"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"circle.a", "circle.b", "circle.c"}
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:]))  # each step is an import, in its direction
    assert find_cycle({"x": {"y"}, "y": set()}) is None


@pytest.mark.parametrize("package", ["carclf.core", "carclf.data", "carclf.models", "carclf.training",
                                     "carclf.tracking", "carclf.report", "carclf.serving", "sweeps.search",
                                     "sweeps.run", "sweeps.analysis"])
def test_every_name_a_package_exports_is_there(package):
    module = __import__(package, fromlist=["__all__"])
    assert module.__all__ and module.__doc__
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package} exports names its modules lack: {missing}"


@pytest.mark.parametrize(("module", "allowed"), [
    ("carclf.cli", set()),  # `carclf --help`
    ("carclf.tracking.server", set()),  # `carclf server`
    ("carclf.tracking.runs", {"mlflow", "pandas"}),  # `carclf ui`: MLflow's server, no model code
])
def test_light_commands_import_no_heavy_library(module, allowed):
    code = (f"import json, sys, {module}; heavy = {{'torch', 'mlflow', 'matplotlib', 'sklearn', 'timm', 'pandas'}}; "
            "print(json.dumps(sorted(heavy & {m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert set(json.loads(out)) <= allowed, f"{module} imports {out.strip()}"


if __name__ == "__main__":
    cycle = find_cycle(import_graph(*PACKAGES))
    print("import cycle: " + " -> ".join(cycle) if cycle else "no import cycle")
    sys.exit(1 if cycle else 0)
