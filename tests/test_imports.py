"""Data flows one way: no import cycle among the modules of mtkd and data_modules, and
data_modules imports nothing of mtkd (it describes what it needs with protocols)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

PACKAGES = ("mtkd", "data_modules")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def statements(tree: ast.AST, lazy: bool) -> list[ast.AST]:
    """The nodes of ``tree``; without ``lazy``, those run at import time only (function bodies
    and ``if TYPE_CHECKING`` blocks left out, class bodies and other ``if`` / ``try`` kept)."""
    if lazy:
        return list(ast.walk(tree))
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)  # annotations only: never imported when running
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return found


def imports(path: Path, modules: set[str], root: Path = REPO, lazy: bool = False) -> set[str]:
    """The project modules ``path`` imports (with ``lazy``, function-level imports too). The
    packages a module lies in are not counted: Python runs their ``__init__`` first."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in statements(ast.parse(path.read_text(), str(path)), lazy):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base]).strip(".")
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in modules}
    parts = name.split(".")
    return found - {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def module_graph(root: Path = REPO, lazy: bool = False) -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports(p, modules, root, lazy) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def test_no_import_cycle() -> None:
    """Among the imports that run when a module is loaded."""
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle)


def test_data_modules_has_no_cycle_even_lazily() -> None:
    """A registry importing its own plugins inside a function is a cycle too."""
    graph = {m: t for m, t in module_graph(lazy=True).items() if m.startswith("data_modules")}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_data_modules_imports_nothing_of_mtkd() -> None:
    """Not even lazily, inside a function."""
    reverse = {
        (m, t)
        for m, targets in module_graph(lazy=True).items()
        if m.startswith("data_modules")
        for t in targets
        if t.split(".")[0] == "mtkd"
    }
    assert not reverse, sorted(reverse)


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
    assert loaded["data_modules.b"] == set()
    assert lazy["data_modules.b"] == {"data_modules.a", "mtkd.tasks"}
    assert loaded["mtkd.tasks"] == {"data_modules", "data_modules.a"}
