"""The import graph of src/lmlab, read from the source with ``ast``: no cycles, and the layers.

Every ``import`` counts, at the top of a module or inside a function, method or ``if`` (a lazy
import is still a dependency, and a circle of lazy imports breaks as soon as one of them moves
to the top). ``from lmlab.a import b`` depends on the module ``lmlab.a.b`` when there is one,
else on ``lmlab.a``. Importing a submodule also runs its parent packages' ``__init__``; that
is not an edge here, or every package that re-exports its own modules would be a circle.

The layers (README, Architecture): ``host.py`` is the bottom (it imports no other lmlab module
but ``lmlab.errors``), and nothing in the library imports the command line or the server.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "lmlab"
FRONT_ENDS = ("lmlab.cli", "lmlab.serve")  # what the library serves; it never imports them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Module name -> file, for every .py under src/lmlab (a package is its __init__.py)."""
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in ``path`` names, resolved against lmlab's modules;
    for ``from x import y`` both ``x.y`` and ``x``, to be narrowed by ``import_graph``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    found: set[tuple[str, tuple[str, ...]]] = set()
    for node in ast.walk(tree):  # ast.walk reaches imports inside functions, methods and ifs too
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add((alias.name, ()))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add((target, tuple(a.name for a in node.names)))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmlab modules it imports (self-imports left out)."""
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for target, names in imported_names(path, name, path.name == "__init__.py"):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            if not names:  # import lmlab.a.b
                deps.add(target)
                continue
            for n in names:  # from lmlab.a import b: the module lmlab.a.b if there is one, else lmlab.a
                deps.add(f"{target}.{n}" if f"{target}.{n}" in modules else target)
        deps.discard(name)
        graph[name] = {d for d in deps if d in modules}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first from start back to start, inside the component: the shortest cycle through it
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & comp):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(cycle)
    return cycles


def test_the_graph_is_read_from_the_source():
    """The reader sees top-level, lazy and relative imports, and resolves from-imports to modules."""
    graph = import_graph()
    assert "lmlab.host" in graph and "lmlab.bench" in graph and "lmlab.cli.main" in graph
    assert "lmlab.errors" in graph["lmlab.lm"]  # from lmlab.errors import LmlabError: the module
    assert "lmlab.inspect.hooks" in graph["lmlab.lm"]  # imported inside LM.hooks


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in src/lmlab:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_nothing_in_the_library_imports_the_front_ends():
    bad = []
    for module, deps in import_graph().items():
        for front in FRONT_ENDS:
            inside = module == front or module.startswith(front + ".")
            if module.startswith("lmlab.cli") or inside:  # the CLI may drive the server, and each itself
                continue
            bad += [f"{module} -> {d}" for d in sorted(deps) if d == front or d.startswith(front + ".")]
    assert not bad, "the library imports a front end:\n" + "\n".join("  " + b for b in bad)


def test_host_is_the_bottom_layer():
    deps = import_graph()["lmlab.host"]
    assert deps <= {"lmlab.errors"}, f"lmlab.host imports {sorted(deps)}; it must stand on nothing but lmlab.errors"
