"""The agent's layout as docs/ARCHITECTURE.md describes it: small modules, packages that say
their job, and no import cycles (a cycle is two modules that cannot be understood, tested or
moved apart).

Imports are read from the source with `ast`, including those inside functions (a deferred
import is still a dependency); only `if TYPE_CHECKING:` blocks are left out, since they never
run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agent" / "pixiebox"
#: The review's bound for one module ("about 600 lines"): past it a module holds two jobs.
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pixiebox modules `name` imports (a package import counts as its __init__)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_is_over_the_size_bound() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    too_big = {name: size for name, size in sizes.items() if size > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines: {too_big}"


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_packages_form_layers() -> None:
    """Packages, not only modules, import one way (docs/ARCHITECTURE.md draws the layers)."""
    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        package = name.split(".")[1] if "." in name else name
        graph.setdefault(package, set())
        for target in targets:
            other = target.split(".")[1] if "." in target else target
            graph.setdefault(other, set())
            if other != package and other != "pixiebox":
                graph[package].add(other)
    assert cycles(graph) == []
    # The foundations import no other pixiebox package (they are what everyone builds on).
    assert graph["events"] == set()
    assert graph["config"] == set()
    assert graph["net"] == set()


def test_every_package_says_its_job() -> None:
    silent = [
        module_name(init)
        for init in PACKAGE.rglob("__init__.py")
        if ast.get_docstring(ast.parse(init.read_text())) is None
    ]
    assert not silent, f"packages without a docstring: {silent}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above cannot pass by finding nothing: a known cycle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_private_names_are_imported_across_modules() -> None:
    offenders = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pixiebox"):
                offenders += [
                    f"{name}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert not offenders, offenders
