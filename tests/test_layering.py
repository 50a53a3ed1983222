"""The package's layers point down: its import graph, read from the source (``ast``, nothing is imported), has no
cycle; no module uses another module's private (``_name``) objects; the core imports nothing from the layers above it
(``eval``, ``cli``, ``pipeline``).

Every ``import`` counts, also those inside functions (a deferred import is still a dependency); those under
``if TYPE_CHECKING:`` do not (they never run). ``importlib.import_module`` calls are not seen: the registry loads the
built-in plugin by name, as it loads third-party entry points.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "kvpress_like"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
TOP = ("kvpress_like.eval", "kvpress_like.cli", "kvpress_like.pipeline")  # what the core must not import
NOT_CORE = (*TOP, "kvpress_like.__main__")

# Known exceptions, each named, until their owner removes them: none (calibration.py's upward imports and private uses
# are gone).
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def imports_of(name: str, source: str | None = None, package: bool = False) -> tuple[set[str], list[tuple]]:
    """The package modules ``name`` imports (its file, or ``source``), and its uses of other modules' private names as
    ``(importer, module, name)``: ``from m import _x`` and ``m._x`` on an imported module ``m``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8") if source is None else source)
    skipped = _type_checking_nodes(tree)
    targets, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    targets.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package or (name in MODULES and is_package(name)) else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    targets.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                targets.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((name, source, alias.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and id(node) not in skipped):
            module = aliases[node.value.id]
            if f"{module}.{node.attr}" not in MODULES and module != name:
                private.append((name, module, node.attr))
    return {t for t in targets if t in MODULES and t != name}, private


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    """The walk sees the package and the imports that shape it (a broken walk would pass every test below)."""
    assert len(MODULES) > 30 and "kvpress_like.press" in MODULES and "kvpress_like.compressors.snapkv" in MODULES
    assert "kvpress_like.press" in GRAPH["kvpress_like.compressors.snapkv"][0]
    assert "kvpress_like.cache" in GRAPH["kvpress_like.press"][0]
    assert "kvpress_like.registry" in GRAPH["kvpress_like.context"][0]  # an import inside a function counts


def test_no_import_cycle():
    found = cycles({name: targets for name, (targets, _) in GRAPH.items()})
    assert not found, "import cycles in the package (dependencies must point down): " + "; ".join(
        " <-> ".join(component) for component in found)


def test_no_private_name_of_another_module():
    used = sorted({use for _, uses in GRAPH.values() for use in uses} - KNOWN_PRIVATE)
    assert not used, "modules use other modules' private names: " + "; ".join(
        f"{importer} uses {module}.{name}" for importer, module, name in used)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != PACKAGE and not n.startswith(NOT_CORE)))
def test_core_does_not_import_the_layers_above(name):
    upward = sorted(t for t in GRAPH[name][0] if t.startswith(TOP) and (name, t) not in KNOWN_UPWARD)
    assert not upward, f"{name} imports {upward}: the core must not depend on eval, cli or pipeline"


def test_the_checks_catch_what_they_look_for():
    """The detectors themselves: a cycle, a private import and a private attribute of an imported module."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = "from .cache import _hidden\nfrom . import registry\nregistry._tables\nregistry.list_presses()\n"
    targets, private = imports_of("kvpress_like._layering_probe", source)
    assert targets == {"kvpress_like.cache", "kvpress_like.registry"}
    assert private == [("kvpress_like._layering_probe", "kvpress_like.cache", "_hidden"),
                       ("kvpress_like._layering_probe", "kvpress_like.registry", "_tables")]
