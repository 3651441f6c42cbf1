"""Data flows one way: no import cycle among the modules of mtkd and data_modules (not even
through a function-level import), data_modules imports nothing of mtkd (it describes what it needs
with protocols), and no import climbs the layers of ``LAYERS``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

PACKAGES = ("mtkd", "data_modules")

#: every module, top layer first; an import may go down or stay in its layer, never up. A
#: ``pkg.*`` entry places a whole package. data_modules is the bottom: it imports nothing of mtkd,
#: while mtkd's own small helpers ("infrastructure") may use it (config saves with data_modules.io).
LAYERS: dict[str, tuple[str, ...]] = {
    # cli builds its table from mtkd.commands: one module per command, and the modules that
    # hold a command's work (reporting, prediction, ...), which its main imports when run
    "commands": (
        "mtkd.cli",
        "mtkd.commands",
        "mtkd.commands.args",
        "mtkd.commands.cache_check",
        "mtkd.commands.cache_teacher",
        "mtkd.commands.demo",
        "mtkd.commands.demo_runs",
        "mtkd.commands.distill",
        "mtkd.commands.evaluate",
        "mtkd.commands.export",
        "mtkd.commands.exporting",
        "mtkd.commands.init",
        "mtkd.commands.predict",
        "mtkd.commands.prediction",
        "mtkd.commands.report",
        "mtkd.commands.reporting",
        "mtkd.commands.study",
        "mtkd.commands.study_runs",
        "mtkd.commands.sweep_local",
        "mtkd.commands.sweeps",
        "mtkd.commands.synth",
        "mtkd.commands.train_teacher",
    ),
    # evaluation is the evaluate stage's scoring (stages.evaluate, report); it needs only tasks.
    # derived: the measures read from predicted masks and points (evaluate, predict, export)
    # run_config checks a composed config against the registries of the layers below it
    "stages": ("mtkd.stages", "mtkd.evaluation", "mtkd.derived", "mtkd.run_config"),
    # tracking: the training run's loggers and their callbacks (W&B's panels draw tasks)
    "modules / kd": (
        "mtkd.modules",
        "mtkd.modules.checkpoint",
        "mtkd.modules.common",
        "mtkd.modules.optim",
        "mtkd.modules.student",
        "mtkd.modules.sync_batchnorm",
        "mtkd.modules.teacher",
        "mtkd.modules.weighting",
        "mtkd.kd",
        "mtkd.kd.cache",
        "mtkd.kd.ensemble",
        "mtkd.kd.fidelity",
        "mtkd.kd.teacher_source",
        "mtkd.tracking",
        "mtkd.tracking.loggers",
        "mtkd.tracking.wandb_logger",
        "mtkd.tracking.wandb_panels",
    ),
    # profiling measures a network (models.multitask.count_parameters): not infrastructure.
    # The kd package spans two layers: the task kinds register into its KD-loss registry and
    # encode their cached arrays by its CacheStorage, so kd.losses and kd.storage sit here,
    # below the kinds, while the rest of kd (cache, ensemble, teacher sources) uses the kinds;
    # mtkd/kd/__init__.py imports nothing, so the package itself stays in the layer above
    "models / tasks": (
        "mtkd.kd.losses",
        "mtkd.kd.storage",
        "mtkd.models",
        "mtkd.models.multitask",
        "mtkd.models.pretrained",
        "mtkd.tasks",
        "mtkd.tasks.base",
        "mtkd.tasks.classification",
        "mtkd.tasks.localization",
        "mtkd.tasks.multilabel",
        "mtkd.tasks.regression",
        "mtkd.tasks.segmentation",
        "mtkd.tasks.text",
        "mtkd.profiling",
    ),
    # imported from every layer; config is the schema, ConfigError and composition
    "infrastructure": (
        "mtkd",
        "mtkd.config",
        "mtkd.locks",
        "mtkd.markdown",
        "mtkd.outputs",
        "mtkd.safe_load",
        "mtkd.status",
        "mtkd.threads",
    ),
    "data_modules": ("data_modules", "data_modules.*"),
}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Each module of PACKAGES under ``root``, by name."""
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def statements(tree: ast.AST, lazy: bool, typing: bool = False) -> list[ast.AST]:
    """The nodes of ``tree`` that run at import time (class bodies and other ``if`` / ``try``
    kept); with ``lazy``, function bodies too (they run later, when called); with ``typing``,
    ``if TYPE_CHECKING`` blocks too (never run: a dependency for type checkers only)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if not typing and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif lazy or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return found


def imports(
    path: Path, modules: set[str], root: Path = REPO, lazy: bool = False, typing: bool = False
) -> dict[str, int]:
    """The project modules ``path`` imports, each with the line of its first import (``lazy``,
    ``typing``: see ``statements``). A package counts when it is named for itself (``import
    mtkd.tasks``, ``from mtkd.tasks import Task``: its ``__init__`` must have run), not when it is
    only the way to a submodule (``from mtkd.tasks import base``, ``import mtkd.tasks.base``): so
    ``mtkd.tasks.base`` reading a name back from ``mtkd.tasks`` would be an edge, while being
    inside ``mtkd.tasks`` (Python runs the ``__init__`` first) is none."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in statements(ast.parse(path.read_text(), str(path)), lazy, typing):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base]).strip(".")
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = submodules + ([base] if len(submodules) < len(node.names) else [])
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def module_graph(
    root: Path = REPO, lazy: bool = False, typing: bool = False
) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}."""
    files = module_files(root)
    return {m: imports(p, set(files), root, lazy, typing) for m, p in files.items()}


def without(graph: dict[str, dict[str, int]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in edges} for m, targets in graph.items()}


def find_cycle(graph: dict[str, dict[str, int]] | dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
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


def layer_of(module: str, layers: dict[str, tuple[str, ...]]) -> str | None:
    """The layer that lists ``module`` (or a ``pkg.*`` it lies in), or None."""
    for layer, members in layers.items():
        if module in members or any(
            m.endswith(".*") and module.startswith(m[:-1]) for m in members
        ):
            return layer
    return None


def unplaced(modules: set[str], layers: dict[str, tuple[str, ...]]) -> list[str]:
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_edges(
    graph: dict[str, dict[str, int]], layers: dict[str, tuple[str, ...]]
) -> dict[tuple[str, str], int]:
    """The imports that go from a module to one in a higher layer, each with its line (those of
    an unplaced module are left to ``unplaced``)."""
    rank = {m: i for i, layer in enumerate(layers) for m in graph if layer_of(m, layers) == layer}
    return {
        (m, t): line
        for m, targets in graph.items()
        for t, line in targets.items()
        if m in rank and t in rank and rank[t] < rank[m]
    }


def describe(
    edges: dict[tuple[str, str], int], layers: dict[str, tuple[str, ...]], root: Path = REPO
) -> str:
    """One ``file:line: a (layer) imports b (layer)`` line per edge."""
    files = module_files(root)
    return "\n".join(
        f"{files[a].relative_to(root)}:{line}: {a} ({layer_of(a, layers)}) imports {b} "
        f"({layer_of(b, layers)})"
        for (a, b), line in sorted(edges.items())
    )


def test_no_import_cycle() -> None:
    """Among the imports that run when a module is loaded."""
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_lazy_import_cycle() -> None:
    """A registry importing its own plugins inside a function is a cycle too."""
    cycle = find_cycle(module_graph(lazy=True))
    assert cycle is None, " -> ".join(cycle)


def test_data_modules_imports_nothing_of_mtkd() -> None:
    """Not even lazily inside a function, nor for type checkers only."""
    reverse = {
        (m, t)
        for m, targets in module_graph(lazy=True, typing=True).items()
        if m.startswith("data_modules")
        for t in targets
        if t.split(".")[0] == "mtkd"
    }
    assert not reverse, sorted(reverse)


def test_every_module_has_a_layer() -> None:
    """A new module is placed by hand, so that the layer check covers it; a removed one leaves."""
    modules = set(module_files())
    missing = unplaced(modules, LAYERS)
    assert not missing, (
        f"add {missing} to LAYERS in tests/test_imports.py, in the layer of what they import"
    )
    listed = {m for members in LAYERS.values() for m in members if not m.endswith(".*")}
    assert listed <= modules, f"remove {sorted(listed - modules)} from LAYERS: no such module"


def test_no_import_climbs_a_layer() -> None:
    """Function-level and TYPE_CHECKING imports included: each is a dependency on the layer."""
    upward = upward_edges(module_graph(lazy=True, typing=True), LAYERS)
    assert not upward, "imports that climb a layer (see LAYERS):\n" + describe(upward, LAYERS)


def test_the_checks_see_a_cycle_and_a_reverse_import(tmp_path: Path) -> None:
    """The graph is read from the sources: two modules importing each other (one lazily) form
    a cycle, and a data_modules file importing mtkd shows up as an edge."""
    (tmp_path / "mtkd").mkdir()
    (tmp_path / "data_modules").mkdir()
    (tmp_path / "mtkd" / "__init__.py").write_text("")
    (tmp_path / "data_modules" / "__init__.py").write_text("")
    (tmp_path / "data_modules" / "a.py").write_text("from data_modules.b import x\n")
    (tmp_path / "data_modules" / "b.py").write_text(
        "def f():\n    from . import a\n    import mtkd.tasks\n"
    )
    (tmp_path / "mtkd" / "tasks.py").write_text("from data_modules import a\n")
    (tmp_path / "mtkd" / "c.py").write_text("class C:\n    from mtkd import d\n")
    (tmp_path / "mtkd" / "d.py").write_text("import mtkd.c\n")
    loaded, lazy = module_graph(tmp_path), module_graph(tmp_path, lazy=True)
    assert find_cycle(loaded) == ["mtkd.c", "mtkd.d", "mtkd.c"]
    assert find_cycle({m: t for m, t in lazy.items() if m.startswith("data_modules")}) == [
        "data_modules.a",
        "data_modules.b",
        "data_modules.a",
    ]
    assert loaded["data_modules.b"] == {}
    assert lazy["data_modules.b"] == {"data_modules.a": 2, "mtkd.tasks": 3}
    assert set(loaded["mtkd.tasks"]) == {"data_modules.a"}


def test_the_checks_see_a_parent_import_a_lazy_cycle_and_a_climb(tmp_path: Path) -> None:
    """A module reading a name back from its own package's ``__init__`` (inside a function) is
    an edge, and with the ``__init__`` importing it, a lazy cycle; being in the package is no edge.
    An import from a lower layer to a higher one is reported, lazily or for type checkers only;
    a module left out of the table is reported too."""
    tasks = tmp_path / "mtkd" / "tasks"
    tasks.mkdir(parents=True)
    (tmp_path / "data_modules").mkdir()
    (tmp_path / "mtkd" / "__init__.py").write_text("")
    (tmp_path / "data_modules" / "__init__.py").write_text("")
    (tasks / "__init__.py").write_text("from mtkd.tasks.base import build\nKINDS = {}\n")
    (tasks / "base.py").write_text("def build():\n    from mtkd.tasks import KINDS\n")
    (tasks / "kinds.py").write_text("from . import base\nfrom mtkd.tasks.base import build\n")
    (tmp_path / "mtkd" / "stages.py").write_text("import mtkd.tasks\n")
    (tmp_path / "mtkd" / "status.py").write_text("def f():\n    from mtkd.stages import g\n")
    (tmp_path / "mtkd" / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mtkd import stages\n"
    )
    (tmp_path / "mtkd" / "new.py").write_text("")
    loaded, lazy = module_graph(tmp_path), module_graph(tmp_path, lazy=True)
    assert lazy["mtkd.tasks.base"] == {"mtkd.tasks": 2}
    assert lazy["mtkd.tasks.kinds"] == {"mtkd.tasks.base": 1}  # no edge to its own package
    assert find_cycle(loaded) is None
    assert find_cycle(lazy) == ["mtkd.tasks", "mtkd.tasks.base", "mtkd.tasks"]
    assert find_cycle(without(lazy, {("mtkd.tasks.base", "mtkd.tasks")})) is None

    layers = {
        "stages": ("mtkd.stages",),
        "tasks": ("mtkd.tasks", "mtkd.tasks.*"),
        "infrastructure": ("mtkd", "mtkd.status", "mtkd.cli"),
        "data_modules": ("data_modules", "data_modules.*"),
    }
    typed = module_graph(tmp_path, lazy=True, typing=True)
    assert unplaced(set(typed), layers) == ["mtkd.new"]
    upward = upward_edges(typed, layers)
    assert upward == {("mtkd.status", "mtkd.stages"): 2, ("mtkd.cli", "mtkd.stages"): 3}
    assert describe(upward, layers, tmp_path).splitlines()[1] == (
        "mtkd/status.py:2: mtkd.status (infrastructure) imports mtkd.stages (stages)"
    )
    assert upward_edges(module_graph(tmp_path), layers) == {}  # both are function-level or typing
