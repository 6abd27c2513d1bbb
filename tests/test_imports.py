"""The import graph of ``sign_sae``, ``analyses``, ``experiments`` and ``benchmarks``, read with
``ast`` (nothing is imported).

Data flows one way, up the layers ``LAYERS``: the library (``sign_sae``) never imports
``analyses``; neither imports ``experiments`` or ``benchmarks``, and those two never import each
other. One exception, ``sign_sae.cli``: the ``sign-sae`` entry point offers ``report``, ``sweep``
(with the polarity columns), ``demo`` and ``frontier``, which live in ``analyses``, so its command
functions import ``analyses`` there, inside the functions (importing ``sign_sae`` never loads
``analyses``). No project module imports itself back through a chain of imports, at module level
or inside functions.

Edges: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a`` (its ``__init__`` runs and is
read), plus ``a.b`` when ``b`` is a submodule; ``from a.b import c`` -> ``a.b`` (plus ``a.b.c``
when ``c`` is a submodule). A package ``__init__`` is the module named after the package (a
folder without one, ``experiments``, is no module). The implicit import of parent packages is not
an edge (every package would cycle with its own ``__init__``). Imports under
``if TYPE_CHECKING:`` are not edges.
"""

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sign_sae": 0, "analyses": 1, "experiments": 2, "benchmarks": 2}
PACKAGES = tuple(LAYERS)
CLI = "sign_sae.cli"  # the one module allowed an arrow up (into analyses, inside its functions)

Edge = tuple[str, str, int]  # (importer, imported, line)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the project packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[list[Edge], list[Edge]]:
    """The project modules ``name`` imports: (at module level, inside functions)."""
    is_package = path.name == "__init__.py"
    top: list[Edge] = []
    nested: list[Edge] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [_known(a.name, modules) for a in node.names]
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        found = [_known(base, modules)]
        found += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        return found

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            edges = nested if in_function else top
            edges += [(name, t, node.lineno) for t in targets(node) if t and t != name]
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            return
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return top, nested


def _known(dotted: str, modules: dict[str, Path]) -> str:
    """The longest project module that ``dotted`` names or lies in; '' outside the project."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return ""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def graph() -> tuple[list[Edge], list[Edge]]:
    """Every project import edge: (module level, inside functions)."""
    modules = project_modules()
    top: list[Edge] = []
    nested: list[Edge] = []
    for name, path in modules.items():
        t, n = imports(name, path, modules)
        top += t
        nested += n
    return top, nested


def cycles(edges: list[Edge]) -> list[list[str]]:
    """One shortest cycle (a path a -> ... -> a) per group of modules that import each other."""
    succ: dict[str, set[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, set()).add(b)
        succ.setdefault(b, set())
    reach = {node: _reachable(succ, node) for node in succ}
    found, seen = [], set()
    for node in sorted(succ):
        if node in seen or node not in reach[node]:
            continue
        group = {m for m in reach[node] if node in reach[m]}
        seen |= group
        found.append(_cycle(succ, group, node))
    return found


def _reachable(succ: dict[str, set[str]], start: str) -> set[str]:
    """Modules reachable from ``start`` in one step or more."""
    out: set[str] = set()
    todo = list(succ[start])
    while todo:
        node = todo.pop()
        if node not in out:
            out.add(node)
            todo += succ[node]
    return out


def _cycle(succ: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside ``group`` (breadth first)."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(succ[node] & group):
            if child == start:
                back: list[str] = []
                step: str | None = node
                while step is not None:
                    back.append(step)
                    step = parent[step]
                return [*reversed(back), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _show(edges: list[Edge]) -> str:
    return "\n".join(f"  {a} (line {line}) imports {b}" for a, b, line in edges)


def _upward(importer: str, imported: str) -> bool:
    """An arrow to a higher layer, or across to another package of the same layer."""
    a, b = importer.split(".")[0], imported.split(".")[0]
    return LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and a != b)


def test_no_arrow_runs_back_up_except_the_cli_inside_its_commands():
    top, nested = graph()
    wrong = [e for e in top if _upward(e[0], e[1])]
    wrong += [
        e for e in nested if _upward(e[0], e[1]) and not (e[0] == CLI and _in("analyses", e[1]))
    ]
    assert not wrong, "imports that run back up the layers:\n" + _show(wrong)


def test_no_import_cycles():
    top, nested = graph()
    edges = top + nested
    found = cycles(edges)
    lines = {(a, b): line for a, b, line in edges}
    shown = [
        " -> ".join(c)
        + "\n"
        + _show([(a, b, lines[(a, b)]) for a, b in zip(c, c[1:], strict=False)])
        for c in found
    ]
    assert not found, "import cycles:\n" + "\n".join(shown)


def test_the_layers_cover_every_package():
    """Each top-level folder with Python modules is a layer, so none escapes the checks."""
    folders = {p.parent.relative_to(ROOT).parts[0] for p in ROOT.glob("*/*.py")}
    assert folders - {"tests", "examples", "docs"} == set(LAYERS)


def test_the_graph_sees_the_imports_it_checks(tmp_path):
    """The parser on a made-up package: each import form gives the edges the docstring names."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import a\n",
        "a.py": "import pkg.b\nfrom pkg.sub import c\n\ndef f():\n    import pkg.sub.d\n",
        "b.py": "from . import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..b import x\n",
        "sub/d.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = {
        "pkg": pkg / "__init__.py",
        "pkg.a": pkg / "a.py",
        "pkg.b": pkg / "b.py",
        "pkg.sub": pkg / "sub" / "__init__.py",
        "pkg.sub.c": pkg / "sub" / "c.py",
        "pkg.sub.d": pkg / "sub" / "d.py",
    }
    edges = {m: imports(m, p, modules) for m, p in modules.items()}
    pairs = {m: ({b for _, b, _ in t}, {b for _, b, _ in n}) for m, (t, n) in edges.items()}
    assert pairs["pkg"] == ({"pkg.a"}, set())
    assert pairs["pkg.a"] == ({"pkg.b", "pkg.sub", "pkg.sub.c"}, {"pkg.sub.d"})
    assert pairs["pkg.b"] == ({"pkg", "pkg.a"}, set())
    assert pairs["pkg.sub.c"] == ({"pkg.b"}, set())
    top = [e for t, _ in edges.values() for e in t]
    assert cycles(top) == [["pkg", "pkg.a", "pkg.b", "pkg"]]
