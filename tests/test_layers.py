"""The folders of ``stapsrv/`` are layers: a module imports only from its
own layer or those below it, and no two modules import each other, even
through imports made only for type checking."""

from __future__ import annotations

import ast
import configparser
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "stapsrv"

#: Bottom to top. The package's own top-level modules sit with core.
LAYERS = ("core", "config", "identity", "cache", "kernel", "vm", "compile", "app", "cli")
_TOP_LEVEL = {"stapsrv": "core", "stapsrv.paths": "core", "stapsrv.reactor": "core",
              "stapsrv.blocking": "core",
              "stapsrv.__main__": "cli"}


def layer_of(module: str) -> str:
    """The layer of a ``stapsrv`` module, by its folder."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported(tree: ast.AST, modules: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for every ``stapsrv`` module ``tree`` imports, at any
    depth (inside functions and ``if TYPE_CHECKING:`` too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stapsrv"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("stapsrv"):
            for alias in node.names:
                # ``from stapsrv.core import members`` imports a module.
                whole = f"{node.module}.{alias.name}"
                yield node.lineno, whole if whole in modules else node.module


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        edges: dict[str, int] = {}
        for line, target in imported(ast.parse(path.read_text(), str(path)), modules):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class LayerTests(SynchronousTestCase):
    def test_every_folder_is_a_layer(self) -> None:
        folders = {path.name for path in PACKAGE.iterdir()
                   if path.is_dir() and (path / "__init__.py").exists()}
        self.assertEqual(folders, set(LAYERS))

    def test_the_readme_names_every_module_in_its_layout(self) -> None:
        layout = (PACKAGE.parent / "README.md").read_text().split("## Layout", 1)[1]
        unnamed = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
                   if path.name not in ("__init__.py", "__main__.py")
                   and f"`{path.stem}`" not in layout and f"`{path.name}`" not in layout
                   and f"`{module_name(path)}`" not in layout
                   and f"`{module_name(path).removeprefix('stapsrv.')}`" not in layout]
        self.assertEqual(unnamed, [], "modules the README's Layout section does not name")

    def test_every_layer_is_installed(self) -> None:
        parser = configparser.ConfigParser()
        parser.read(PACKAGE.parent / "setup.cfg")
        installed = set(parser["options"]["packages"].split())
        self.assertEqual({f"stapsrv.{layer}" for layer in LAYERS} - installed, set())

    def test_no_module_imports_from_a_layer_above_its_own(self) -> None:
        rank = {layer: position for position, layer in enumerate(LAYERS)}
        upward = [f"{source} line {line} imports {target} ({layer_of(target)} is above "
                  f"{layer_of(source)})"
                  for source, edges in sorted(import_graph().items())
                  for target, line in sorted(edges.items())
                  if rank[layer_of(target)] > rank[layer_of(source)]]
        self.assertEqual(upward, [], "\n".join(upward))

    def test_no_import_cycles(self) -> None:
        found = cycles(import_graph())
        self.assertEqual(found, [], "\n".join(" <-> ".join(cycle) for cycle in found))

    def test_the_checks_see_an_upward_import_and_a_cycle(self) -> None:
        graph = {"stapsrv.core.a": {"stapsrv.app.b": 3}, "stapsrv.app.b": {"stapsrv.core.a": 1}}
        self.assertEqual(cycles(graph), [["stapsrv.app.b", "stapsrv.core.a"]])
        tree = ast.parse("if TYPE_CHECKING:\n    from stapsrv.app.b import X\n")
        self.assertEqual(list(imported(tree, set(graph))), [(2, "stapsrv.app.b")])
