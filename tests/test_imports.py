"""The package boundaries: no import cycles in ``lmforge``, and none of the arrows that must never exist.

Every module of the package is read with ``ast`` (imports at module level and inside functions alike:
a deferred import is still a dependency), and two graphs are built from it: module -> module, and
package -> package, where a package is ``lmforge.<sub>`` (``lmforge.data``, ``lmforge.trained``, ...).
Neither may have a cycle, and the package graph may not hold a forbidden arrow (models import
nothing of lmforge but config; data imports no models or train; train no serve or export; serve no
train). A failure names each offending import by file and line::

    python -m pytest tests/test_imports.py -q
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmforge"

# Package arrows that must never exist: models may import only themselves and config; FORBIDDEN[a] may not hold b.
MODELS_MAY_IMPORT = {"lmforge.models", "lmforge.config"}
FORBIDDEN = {
    "lmforge.data": {"lmforge.models", "lmforge.train"},
    "lmforge.train": {"lmforge.serve", "lmforge.export"},
    "lmforge.serve": {"lmforge.train"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The lmforge modules ``path`` imports, with line numbers; ``from pkg import sub`` names the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(target, line) for target, line in found if target.split(".")[0] == "lmforge" and target != name]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def edges() -> list[tuple[str, str, str]]:
    """(importer, imported, "file:line") for every import of an lmforge module inside lmforge."""
    modules = all_modules()
    out = []
    for name, path in modules.items():
        for target, line in imports_of(path, name, modules):
            out.append((name, target, f"{path.relative_to(ROOT)}:{line}"))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def describe(component: list[str], arrows: list[tuple[str, str, str]]) -> str:
    """A cycle and the imports that close it, each with file:line."""
    members = set(component)
    lines = [f"  {a} -> {b} ({where})" for a, b, where in arrows if a in members and b in members and a != b]
    return f"cycle {' <-> '.join(component)}:\n" + "\n".join(sorted(set(lines)))


def graph_of(arrows: list[tuple[str, str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in arrows:
        if a != b:
            graph[a].add(b)
    return graph


def forbidden(arrows: list[tuple[str, str, str]]) -> list[str]:
    """Every import along an arrow that must not exist, as "from -> to (file:line)"."""
    bad = []
    for a, b, where in arrows:
        if a == b:
            continue
        if a == "lmforge.models" and b not in MODELS_MAY_IMPORT or b in FORBIDDEN.get(a, ()):
            bad.append(f"  {a} -> {b} ({where})")
    return sorted(set(bad))


def package_arrows() -> list[tuple[str, str, str]]:
    return [(package_of(a), package_of(b), where) for a, b, where in edges()]


def test_no_module_cycles():
    arrows = edges()
    found = cycles(graph_of(arrows))
    assert not found, "import cycles between modules:\n" + "\n".join(describe(c, arrows) for c in found)


def test_no_package_cycles():
    arrows = package_arrows()
    found = cycles(graph_of(arrows))
    assert not found, "import cycles between packages:\n" + "\n".join(describe(c, arrows) for c in found)


def test_no_forbidden_arrows():
    bad = forbidden(package_arrows())
    assert not bad, "imports that cross a forbidden boundary:\n" + "\n".join(bad)


def test_registry_names_are_the_config_choices():
    """``model.arch``'s choices are the registry's names, each paired with its own class."""
    from lmforge.config import ARCHS
    from lmforge.models import REGISTRY

    assert tuple(REGISTRY) == ARCHS
    assert {n: c.__name__ for n, c in REGISTRY.items()} == {
        "transformer": "Transformer", "lstm": "LSTMModel", "gru": "GRUModel", "cnn": "GatedCNN", "hf": "HFCausalLM"}


def test_the_walk_sees_every_kind_of_import(tmp_path: Path):
    """The checker itself: function-level and relative imports count, and a planted cycle is caught."""
    modules = {"lmforge.a": tmp_path / "a.py", "lmforge.b": tmp_path / "b.py"}
    modules["lmforge.a"].write_text("def f():\n    from lmforge import b\n", encoding="utf-8")
    modules["lmforge.b"].write_text("from . import a\n", encoding="utf-8")
    assert imports_of(modules["lmforge.a"], "lmforge.a", modules) == [("lmforge.b", 2)]
    assert imports_of(modules["lmforge.b"], "lmforge.b", modules) == [("lmforge.a", 1)]
    assert cycles({"lmforge.a": {"lmforge.b"}, "lmforge.b": {"lmforge.a"}}) == [["lmforge.a", "lmforge.b"]]
    assert forbidden([("lmforge.models", "lmforge.serve", "x.py:3")]) == ["  lmforge.models -> lmforge.serve (x.py:3)"]
    assert forbidden([("lmforge.models", "lmforge.config", "x.py:3")]) == []


MAX_FUNCTION_LINES = 80  # issue #17: a function a reader takes in at once (the loop's step is about 60)


def test_no_function_is_longer_than_a_screen():
    """Every function of the package, nested ones included, is at most MAX_FUNCTION_LINES long."""
    long = []
    for path in all_modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions: " + "; ".join(long)
