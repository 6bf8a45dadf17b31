"""The import graph of ``src/hf_ddlr`` has no cycle, and the trajectory package does not import the Hub facade.

Read statically with :mod:`ast`: every ``import``/``from ... import`` counts, at module level or inside a
function (a function-level import is still a dependency; it only defers the cycle to the first call).
Imports under ``if TYPE_CHECKING:`` are left out: they never run.

Importing ``a.b.c`` from outside package ``a.b`` first runs ``a/b/__init__.py``, so such an import is an
edge to ``a.b`` too; a module's own parent packages are already being imported and are no edge.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "hf_ddlr"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (anywhere in the file, outside ``if TYPE_CHECKING:``)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The ``hf_ddlr`` modules that ``node`` (a statement of ``module``) imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != PACKAGE:
        return set()
    submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
    # `from pkg import submodule` needs only the submodule; `from pkg import name` runs pkg/__init__.py
    return submodules | ({source} if len(submodules) < len(node.names) else set())


def _with_packages(module: str, target: str) -> set[str]:
    """``target`` and those of its parent packages that importing it from ``module`` runs."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    already = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")) + 1)}
    return chain - already


def import_graph(root: Path = SRC / PACKAGE) -> dict[str, set[str]]:
    """``{module: the hf_ddlr modules it imports}`` for every module under ``root``."""
    files = {_module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _runtime_imports(tree):
            for target in _targets(module, path.name == "__init__.py", node, modules):
                edges |= _with_packages(module, target)
        graph[module] = (edges & modules) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "hf_ddlr.trajectory.record" in graph and "hf_ddlr.hub" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_trajectory_package_does_not_import_the_hub_facade_or_the_trainer():
    graph = import_graph()
    for module, targets in graph.items():
        if module == "hf_ddlr.trajectory" or module.startswith("hf_ddlr.trajectory."):
            bad = targets & {"hf_ddlr.hub", "hf_ddlr.trainer", "hf_ddlr"}
            assert not bad, f"{module} imports {sorted(bad)}: the trajectory package sits below them"
    assert "hf_ddlr.trajectory" in graph["hf_ddlr.hub"]  # hub.py depends on the trajectory package


@pytest.mark.parametrize(
    "statement",
    [
        "from ..hub import push_trajectory",  # at module level
        "def push(t):\n    from ..hub import push_trajectory\n    return push_trajectory(t, 'r')",  # deferred
        "def push(t):\n    from .. import hub\n    return hub.push_trajectory(t, 'r')",
    ],
)
def test_a_hub_import_inside_the_trajectory_package_is_a_cycle(tmp_path, statement):
    """The check sees the cycle the refactor removed: a copy of the package with ``hub`` imported back."""
    copy = tmp_path / PACKAGE
    shutil.copytree(SRC / PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    record = copy / "trajectory" / "record.py"
    record.write_text(record.read_text(encoding="utf-8") + "\n\n" + statement + "\n", encoding="utf-8")
    cycle = find_cycle(import_graph(copy))
    assert cycle is not None and "hf_ddlr.hub" in cycle and "hf_ddlr.trajectory.record" in cycle


def test_type_checking_imports_and_outside_packages_are_no_edges():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nimport torch\nif TYPE_CHECKING:\n    from .record import X\n"
        "else:\n    from .io import Y\nfrom . import kfold\nfrom .report import PLOT_KINDS\n"
    )
    modules = {"hf_ddlr.trajectory", "hf_ddlr.trajectory.kfold", "hf_ddlr.trajectory.report",
               "hf_ddlr.trajectory.io", "hf_ddlr.trajectory.record"}
    targets = set()
    for node in _runtime_imports(tree):
        targets |= _targets("hf_ddlr.trajectory.card", False, node, modules)
    assert targets == {"hf_ddlr.trajectory.io", "hf_ddlr.trajectory.kfold", "hf_ddlr.trajectory.report"}


def test_type_checkers_see_each_name_the_package_loads_on_first_use():
    """``hf_ddlr.__getattr__`` loads the TRL trainers on first use (so hf_ddlr does not require TRL); the
    ``if TYPE_CHECKING:`` block of ``__init__`` re-exports the same names from the same modules, so that mypy and
    pyright (the package ships ``py.typed``) type ``from hf_ddlr import MetaSFTTrainer`` as the real class."""
    import hf_ddlr

    tree = ast.parse((SRC / PACKAGE / "__init__.py").read_text())
    seen = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name}: re-export it as `{alias.name} as {alias.name}`"
                    seen[alias.name] = f"{PACKAGE}.{imp.module}"
    lazy = hf_ddlr._TRL_NAMES + hf_ddlr._REWARD_NAMES + hf_ddlr._DPO_NAMES
    assert set(seen) == set(lazy)
    pytest.importorskip("trl")
    for name, module in seen.items():
        assert getattr(hf_ddlr, name).__module__ == module, name
