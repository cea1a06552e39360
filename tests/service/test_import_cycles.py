"""No import cycles in ``service/``, and the layers import only downwards (ARCHITECTURE.md).

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``. A function-level import
that hides a cycle still ties the two modules together (neither can be understood, tested or moved
without the other), which is how ``repository → notify → outbox → repository`` went unnoticed. The graph
is read from the source with :mod:`ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "service"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ``service.*`` module ``path`` imports, wherever the import statement is.

    ``from package import submodule`` is an edge to the submodule only: importing a submodule always runs
    its package's ``__init__`` first, as for ``import package.submodule``, and that is not counted either.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from pkg import module` depends on the module; `from module import name` on the module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_hidden_cycle(tmp_path: Path) -> None:
    """The detector itself: function-level and TYPE_CHECKING imports are edges; a loop is a cycle."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import service.x\n"
        "def f():\n    from service.store import outbox\n"
        "from . import sibling\n"
    )
    known = {"service.x", "service.store", "service.store.outbox", "service.pkg.sibling", "service.y"}
    assert _imports("service.pkg.m", src, known) == {
        "service.x",
        "service.store.outbox",
        "service.pkg.sibling",
    }


def test_no_import_cycles_in_service() -> None:
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycles(graph) == []


# (importer prefix, imported prefixes it must never reach): ARCHITECTURE.md, "What must never be"
FORBIDDEN = [
    (
        "service.store",
        ("service.inference", "service.worker", "service.routing", "service.api", "service.deliver"),
    ),
    ("service.store", ("service.analyse", "service.events", "service.ingest")),
    ("service.results", ("service.store", "service.deliver", "service.api", "service.worker")),
    ("service.assemble", ("service.store",)),
    ("service.inference", ("service.api", "service.store", "service.training")),
]


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN)
def test_layers_import_only_downwards(importer: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        f"{src} imports {dst}"
        for src, targets in _graph().items()
        if src == importer or src.startswith(importer + ".")
        for dst in targets
        if any(dst == f or dst.startswith(f + ".") for f in forbidden)
    )
    assert bad == []
