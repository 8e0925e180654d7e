"""The architecture, checked from the code itself (DESIGN.md, "Layers: data flows one way").

Every module of consumer/ and sinks/ is parsed with `ast`, and every import counts wherever it
is written: at module level, inside a function (a deferred import), or under
`if TYPE_CHECKING:`.

- no module of consumer imports sinks;
- sinks import nothing of consumer but the package itself, and only names in its `__all__`
  (so does the third party's sink of tests/fixtures/plugin_sink);
- no import cycle among the modules of consumer/ and sinks/;
- each subpackage of consumer says in its docstring what it owns;
- no class over 400 lines, no function over 60, but for the declarative tables listed below;
- the public names report `consumer` as their module, so tracebacks show the public path.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import sys
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import consumer
from tests.fixtures.plugins import MEMO_PLUGIN_DIR

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("consumer", "sinks")
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60

# Declarative tables, exempt from the size limits: "path::qualified name" -> why it is long.
SIZE_ALLOWED = {
    "consumer/cli/checkpoint.py::add_checkpoint_parser": (
        "argparse declarations of the checkpoint sub-commands: one add_argument per flag"
    ),
    "consumer/cli/replay.py::add_replay_parser": (
        "argparse declarations of the replay command: one add_argument per flag"
    ),
    "consumer/runtime/metrics.py::Metrics.__init__": (
        "the metric declarations: one Counter, Gauge or Histogram with its help text each"
    ),
}


# --- reading the code ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Module:
    name: str  # "consumer.engine.sink"; a package's __init__ is the package's name
    path: str  # for messages, e.g. "consumer/engine/sink.py"
    tree: ast.Module
    is_package: bool

    @classmethod
    def parse(cls, name: str, source: str, *, path: str, is_package: bool) -> Module:
        return cls(name, path, ast.parse(source, filename=path), is_package)


@dataclass(frozen=True, slots=True)
class Import:
    """One name (or one module) an import statement takes from one module."""

    importer: Module
    line: int
    target: str  # the module imported from, absolute, e.g. "consumer.core.errors"
    name: str | None  # `from target import name`; None for `import target`
    where: str  # "module level", "deferred" (inside a function) or "TYPE_CHECKING"

    def describe(self) -> str:
        statement = f"from {self.target} import {self.name}"
        if self.name is None:
            statement = f"import {self.target}"
        where = "" if self.where == "module level" else f" ({self.where})"
        return f"{self.importer.path}:{self.line}{where}: {statement}"


def load_modules(root: Path, packages: Iterable[str]) -> dict[str, Module]:
    """Every module of `packages` under `root`, parsed."""
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            relative = str(path.relative_to(root))
            source = path.read_text(encoding="utf-8")
            modules[name] = Module.parse(name, source, path=relative, is_package=is_package)
    return modules


@cache
def our_modules() -> dict[str, Module]:
    return load_modules(REPO, PACKAGES)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: Module) -> None:
        self.module = module
        self.imports: list[Import] = []
        self._where = ["module level"]

    def _inside(self, where: str, nodes: Iterable[ast.AST]) -> None:
        self._where.append(where)
        for node in nodes:
            self.visit(node)
        self._where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._inside("deferred", ast.iter_child_nodes(node))

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.visit_FunctionDef(node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._inside("TYPE_CHECKING", node.body)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = node.module or ""
        if node.level:  # relative: from the importer's package, one level up per extra dot
            package = self.module.name.split(".")
            if not self.module.is_package:
                package = package[:-1]
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
        for alias in node.names:
            self._add(node, target, alias.name)

    def _add(self, node: ast.stmt, target: str, name: str | None) -> None:
        self.imports.append(Import(self.module, node.lineno, target, name, self._where[-1]))


def imports_of(module: Module) -> list[Import]:
    collector = _ImportCollector(module)
    collector.visit(module.tree)
    return collector.imports


def imported_module(imported: Import, modules: Mapping[str, Module]) -> str | None:
    """The module of `modules` an import loads by name: `from a.b import c` is module a.b.c
    when that is a submodule, else a.b. (Python also runs the parents' __init__ first; that is
    not an edge here, so a cycle means a module really names one that names it back.)"""
    if imported.name is not None and f"{imported.target}.{imported.name}" in modules:
        return f"{imported.target}.{imported.name}"
    return imported.target if imported.target in modules else None


# --- the import graph and its cycles ---------------------------------------------------------

Graph = dict[str, dict[str, Import]]  # module -> module it imports -> the (first) import


def import_graph(modules: Mapping[str, Module]) -> Graph:
    graph: Graph = {name: {} for name in modules}
    for name, module in modules.items():
        for imported in imports_of(module):
            target = imported_module(imported, modules)
            if target is not None:
                graph[name].setdefault(target, imported)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycle_through(start: str, graph: Graph, members: set[str]) -> list[str]:
    """A shortest import cycle from `start` back to it, within `members` (its component)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor in members and successor not in previous:
                previous[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is in no cycle")


def import_cycles(graph: Graph) -> list[str]:
    """Each cycle, as its module path followed by the import statements that make it."""
    found = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for component in strongly_connected(graph):
        start = component[0]
        if len(component) == 1 and start not in graph[start]:
            continue
        cycle = cycle_through(start, graph, set(component))
        steps = [graph[a][b].describe() for a, b in itertools.pairwise(cycle)]
        found.append("\n    ".join([" -> ".join(cycle), *steps]))
    return sorted(found)


def test_no_import_cycles_among_consumer_and_sinks() -> None:
    graph = import_graph(our_modules())
    assert sum(len(edges) for edges in graph.values()) > len(graph), "the graph was not built"
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def _modules(**sources: str) -> dict[str, Module]:
    """Synthetic modules from their source; a name ending in "/" is a package (its __init__)."""
    return {
        name.rstrip("/"): Module.parse(
            name.rstrip("/"), source, path=f"<{name.rstrip('/')}>", is_package=name.endswith("/")
        )
        for name, source in sources.items()
    }


def test_the_cycle_check_reports_a_submodule_importing_the_public_api() -> None:
    modules = _modules(
        **{
            "consumer/": "from consumer.engine.sink import Sink\n",
            "consumer.engine/": '"""The engine."""\n',
            "consumer.engine.sink": "class Sink: ...\n\ndef f():\n    from consumer import Sink\n",
        }
    )
    cycles = import_cycles(import_graph(modules))
    assert cycles == [
        "consumer -> consumer.engine.sink -> consumer\n"
        "    <consumer>:1: from consumer.engine.sink import Sink\n"
        "    <consumer.engine.sink>:4 (deferred): from consumer import Sink"
    ]


def test_imports_resolve_to_the_module_named_without_edges_to_parent_packages() -> None:
    modules = _modules(
        **{
            "a/": "from a.b import c\nfrom a.b import helper\n",
            "a.b/": "from . import d\nfrom .. import thing\n",
            "a.b.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.b.d\n",
            "a.b.d": "from .c import x\n",
        }
    )
    graph = import_graph(modules)
    assert {name: sorted(edges) for name, edges in graph.items()} == {
        "a": ["a.b", "a.b.c"],
        "a.b": ["a", "a.b.d"],
        "a.b.c": ["a.b.d"],
        "a.b.d": ["a.b.c"],
    }
    assert graph["a.b.c"]["a.b.d"].where == "TYPE_CHECKING"
    cycles = import_cycles(graph)
    assert [cycle.splitlines()[0] for cycle in cycles] == [
        "a -> a.b -> a",
        "a.b.c -> a.b.d -> a.b.c",
    ]


# --- which layer may import which ------------------------------------------------------------


def _modules_of(package: str) -> list[Module]:
    return [m for name, m in our_modules().items() if name.split(".")[0] == package]


def test_consumer_never_imports_sinks() -> None:
    offenders = [
        imported.describe()
        for module in _modules_of("consumer")
        for imported in imports_of(module)
        if imported.target.split(".")[0] == "sinks"
    ]
    assert not offenders, "consumer imports sinks:\n  " + "\n  ".join(offenders)


def public_api_violations(modules: Iterable[Module]) -> list[str]:
    """Imports of consumer other than `import consumer` / `from consumer import <public name>`."""
    public = set(consumer.__all__)
    found = []
    for module in modules:
        for imported in imports_of(module):
            if imported.target.split(".")[0] != "consumer":
                continue
            if imported.target != "consumer":
                found.append(f"{imported.describe()}  <- a private module of consumer")
            elif imported.name is not None and imported.name not in public:
                found.append(f"{imported.describe()}  <- not in consumer.__all__")
    return found


def test_sinks_import_only_the_public_api_of_consumer() -> None:
    offenders = public_api_violations(_modules_of("sinks"))
    assert not offenders, "sinks reach past consumer's public API:\n  " + "\n  ".join(offenders)


def test_the_third_party_sink_imports_only_the_public_api_of_consumer() -> None:
    plugin = load_modules(MEMO_PLUGIN_DIR.parent, [MEMO_PLUGIN_DIR.name])
    imports = [i for module in plugin.values() for i in imports_of(module)]
    assert any(i.target == "consumer" for i in imports), "the plugin was not found"
    offenders = public_api_violations(plugin.values())
    assert not offenders, "the plugin reaches past the public API:\n  " + "\n  ".join(offenders)


def test_the_public_api_check_catches_private_and_unlisted_imports() -> None:
    modules = _modules(
        **{
            "sinks/": "import consumer\nfrom consumer import Sink\n",
            "sinks.x": "def f():\n    from consumer.core.errors import SinkError\n",
            "sinks.y": "from consumer import load_checkpoints_somehow\nimport consumer.engine\n",
        }
    )
    assert public_api_violations(modules.values()) == [
        "<sinks.x>:2 (deferred): from consumer.core.errors import SinkError"
        "  <- a private module of consumer",
        "<sinks.y>:1: from consumer import load_checkpoints_somehow  <- not in consumer.__all__",
        "<sinks.y>:2: import consumer.engine  <- a private module of consumer",
    ]


# --- what each folder owns -------------------------------------------------------------------


def test_every_subpackage_of_consumer_says_what_it_owns() -> None:
    subpackages = [m for m in _modules_of("consumer") if m.is_package and m.name != "consumer"]
    assert len(subpackages) >= 9, "consumer's layers were not found"
    unexplained = []
    for package in subpackages:
        docstring = ast.get_docstring(package.tree) or ""
        if len(docstring.split()) < 5:
            unexplained.append(f"{package.path}: {docstring!r}")
    assert not unexplained, (
        "subpackages without a docstring saying what they own:\n  " + "\n  ".join(unexplained)
    )


def test_every_folder_of_consumer_and_sinks_is_a_package() -> None:
    folders = {path.parent for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    namespace = sorted(
        str(folder.relative_to(REPO)) for folder in folders if not (folder / "__init__.py").exists()
    )
    assert not namespace, f"folders without __init__.py (and so without a docstring): {namespace}"


# --- sizes -----------------------------------------------------------------------------------


def definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.stmt]]:
    """Every class and function under `node`, nested ones included, by qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            yield name, child
            yield from definitions(child, f"{name}.")
        else:
            yield from definitions(child, prefix)


def oversized() -> dict[str, str]:
    """`path::name` -> "class, 418 lines" for every definition over its limit."""
    found = {}
    for module in our_modules().values():
        for name, node in definitions(module.tree):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            is_class = isinstance(node, ast.ClassDef)
            if lines > (MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES):
                kind = "class" if is_class else "function"
                found[f"{module.path}::{name}"] = f"{kind}, {lines} lines"
    return found


def test_no_class_over_400_lines_and_no_function_over_60() -> None:
    offenders = sorted(
        f"{where}: {size}" for where, size in oversized().items() if where not in SIZE_ALLOWED
    )
    assert not offenders, (
        f"{len(offenders)} definitions over the size limits (class {MAX_CLASS_LINES} lines, "
        f"function {MAX_FUNCTION_LINES}); split them, or list a declarative table in "
        "SIZE_ALLOWED with its reason:\n  " + "\n  ".join(offenders)
    )


def test_the_size_allow_list_names_only_oversized_declarative_tables() -> None:
    stale = sorted(set(SIZE_ALLOWED) - set(oversized()))
    assert not stale, f"allowed to be long but no longer are (or are gone): {stale}"
    assert all(reason.strip() for reason in SIZE_ALLOWED.values()), "each needs its reason"


# --- public names ----------------------------------------------------------------------------


def test_public_classes_and_functions_report_consumer_as_their_module() -> None:
    assert len(set(consumer.__all__)) == len(consumer.__all__), "a name is listed twice"
    wrong = []
    for name in consumer.__all__:
        value = getattr(consumer, name)
        if (isinstance(value, type) or inspect.isfunction(value)) and (
            value.__module__ != "consumer"
        ):
            wrong.append(f"{name}: {value.__module__}")
    assert not wrong, f"public names showing their private module: {wrong}"


def test_a_raised_fenced_error_names_consumer_fenced_error() -> None:
    orders = consumer.TopicPartition("orders", 3)
    with pytest.raises(consumer.FencedError) as caught:
        consumer.check_epochs("billing", [orders], current={orders: 8}, expected={orders: 7})
    assert repr(caught.type) == "<class 'consumer.FencedError'>"
    shown = traceback.format_exception(caught.value)
    assert shown[-1].startswith("consumer.FencedError: partitions were taken over"), shown[-1]
