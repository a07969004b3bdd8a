"""The package reads as the pipeline: small modules, no import circle, and the dependency
directions the design promises (attribution and the exporter know nothing of the meters; the
commands reach the exporter only through the composition root).

The import graph is built with `ast` from module-level imports (those under
`if TYPE_CHECKING:` are left out: they never run), so the test reads the tree as it is,
without importing it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "carbond"
MAX_LINES = 500

# carbond/ top level: the pipeline's stages, in the order a joule passes them, then what runs
# them (docs/attribution.md, "The layout is the pipeline").
STAGES = {"meters", "workloads", "pipeline", "attribution.py", "carbon", "ledger", "exporter"}
SUPPORT = {"config", "web", "runtime"}  # read by every stage: keys, the HTTP server, lifecycle
RUNNERS = {"daemon.py", "commands", "cli.py", "types.py", "__init__.py", "__main__.py"}
# What code calls (docs/exec.md, docs/codecarbon.md): `carbond.track`, `carbond.codecarbon`,
# `%load_ext carbond`, and the daemon's exec socket (`runs`) that they and `exec` share.
API = {"tracking.py", "codecarbon.py", "notebook.py", "runs"}
# The composition root and the command that starts the daemon build the exporter.
COMPOSITION = ("carbond.commands.build", "carbond.commands.run")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _type_checking(node):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level(node.body)
            for handler in node.handlers:
                yield from _module_level(handler.body)
            yield from _module_level(node.orelse)
            yield from _module_level(node.finalbody)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level. `from pkg import name` is
    an edge to `pkg.name` where that is a module, else to `pkg` itself."""
    top = root.name
    paths = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets: set[str] = set()
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                targets.add(submodule if submodule in paths else module)
        graph[name] = {t for t in targets if t in paths and t != name and t.split(".")[0] == top}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def reached(graph: dict[str, set[str]], start: str, *, avoid: tuple[str, ...] = ()) -> set[str]:
    """Every module `start` imports, directly or through others, not passing through `avoid`."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen and target not in avoid:
                seen.add(target)
                todo.append(target)
    return seen


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


GRAPH = import_graph(PACKAGE)
MODULES = sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_no_module_over_500_lines(module: str) -> None:
    lines = len((PACKAGE.parent / module).read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by job"


def test_no_import_circle() -> None:
    assert circles(GRAPH) == []


def test_the_checks_see_a_circle_and_a_reach(tmp_path: Path) -> None:
    """The graph is not vacuous: a circle through `from . import` and a relative import is
    found, a TYPE_CHECKING import is not an edge, and the real tree has the known edges."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nimport pkg.a\nif TYPE_CHECKING:\n    import pkg.d\n")
    (package / "d.py").write_text("import pkg.c\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert reached(graph, "pkg.d") == {"pkg.a", "pkg.c", "pkg.sub.b"}
    assert reached(graph, "pkg.d", avoid=("pkg.c",)) == set()
    assert "carbond.attribution" in GRAPH["carbond.pipeline.tick"]
    assert "carbond.exporter.publisher" in GRAPH["carbond.commands.build"]


def test_the_top_level_holds_the_pipelines_stages_and_what_runs_them() -> None:
    present = {path.name for path in PACKAGE.iterdir()
               if path.name != "__pycache__" and (path.suffix == ".py" or path.is_dir())}
    assert present == STAGES | SUPPORT | RUNNERS | API


@pytest.mark.parametrize("start", ["carbond.attribution", "carbond.exporter"])
def test_attribution_and_the_exporter_import_nothing_of_the_meters(start: str) -> None:
    for module in sorted(m for m in GRAPH if _within(m, start)):
        meters = sorted(m for m in reached(GRAPH, module) if _within(m, "carbond.meters"))
        assert meters == [], f"{module} reaches {meters}"


def test_commands_reach_the_exporter_only_through_the_composition_root() -> None:
    commands = sorted(m for m in GRAPH if _within(m, "carbond.commands")
                      and not any(_within(m, root) for root in COMPOSITION))
    assert "carbond.commands.top" in commands and "carbond.commands.exec" in commands
    for module in commands:
        exporter = sorted(m for m in reached(GRAPH, module, avoid=COMPOSITION)
                          if _within(m, "carbond.exporter"))
        assert exporter == [], f"{module} imports {exporter}"
