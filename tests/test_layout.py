"""The package's layout: its modules import one another without a circle."""

import ast
from pathlib import Path

import flowmatch

ROOT = Path(flowmatch.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["flowmatch", *path.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_nodes(tree, deferred: bool):
    """A module's import statements: those run when it is imported, and with ``deferred`` those in its functions too."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif deferred or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _imported(name: str, path: Path, modules: dict, deferred: bool) -> set[str]:
    """The package's modules that module ``name`` imports."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    names = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), deferred):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
            continue
        base = ".".join(package[:len(package) + 1 - node.level]) if node.level else ""
        base = ".".join(p for p in (base, node.module) if p)
        names |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from . import x`: x may be a module
    found = set()
    for imported in names:
        while imported and imported not in modules:
            imported = imported.rpartition(".")[0]
        if imported:
            found.add(imported)
    return found


def _graph(deferred: bool, unit=lambda name: name) -> dict[str, set[str]]:
    """Module -> the modules it imports, both as ``unit(name)``."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph.setdefault(unit(name), set()).update(unit(m) for m in _imported(name, path, modules, deferred))
    return {u: targets - {u} for u, targets in graph.items()}


def _subpackage(name: str) -> str:
    """A subpackage as one module: ``flowmatch.data.pairs`` -> ``flowmatch.data``."""
    return ".".join(name.split(".")[:2])


def _circle(graph: dict[str, set[str]]) -> str | None:
    """One circle of ``graph``, written ``a -> b -> a``, or None (depth-first search)."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state and (circle := visit(nxt, trail + [nxt])):
                return circle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node, [node])):
            return circle
    return None


def test_the_graph_reads_the_imports():
    top, deferred = _graph(False), _graph(True)
    assert {"flowmatch.errors", "flowmatch.files", "flowmatch.data"} <= top["flowmatch.data.pairs"]
    assert "flowmatch" in top["flowmatch.training"]  # from . import __version__
    assert "flowmatch.data" not in top["flowmatch.runs"] and "flowmatch.data" in deferred["flowmatch.runs"]  # in Run.__init__
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"


def test_no_module_imports_one_that_imports_it_back():
    assert (circle := _circle(_graph(deferred=False))) is None, circle
    # imports inside functions count too (a subpackage importing its own parts is one module's business)
    assert (circle := _circle(_graph(deferred=True, unit=_subpackage))) is None, circle
