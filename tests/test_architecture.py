"""The package's shape (docs/architecture.md): no import cycles, between modules or between
the rooms of the layout (a folder per stage, the top-level modules), and the library never
reads the command line (the CLI passes it in), public functions take at most two
positional parameters (the rest by keyword), and an import inside a function says why it is
there.

Imports are read from the source (ast), every one of them: those inside functions
(deferred for start-up time or an optional dependency) are arrows all the same.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tilscore"


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package modules it imports (``from a.b import c`` imports a.b.c when
    that is a module, else a.b; the package root itself is left out)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "tilscore":
                    continue
                found = resolve(target)
                if found not in (None, name, "tilscore"):
                    edges[name].add(found)
    return edges


def _room(module: str) -> str:
    """The room of a module: its folder under tilscore/, or the top-level module itself
    (the package's own ``__init__`` is the room ``tilscore``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for node in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert _cycles(_imports(_modules())) == []


def test_no_import_cycle_between_rooms():
    """Folders by stage: no arrow runs from a room back up to one that imports it."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports(_modules()).items():
        for target in targets:
            if _room(module) != _room(target):
                rooms[_room(module)].add(_room(target))
    assert _cycles(rooms) == []


def test_rooms_are_the_stages():
    """The layout of docs/architecture.md: a folder per stage of the data flow."""
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == {"slide", "prepare", "engine", "scoring", "io", "models", "training",
                       "report", "synth"}


def test_only_the_cli_reads_the_command_line():
    """summary.json records the command line the CLI passes in: a library that read
    sys.argv would record a Dask or Slurm worker's command line instead."""
    readers = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "argv"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                readers.append(name)
    assert set(readers) <= {"tilscore.cli"}


# Public functions or methods allowed more than two positional parameters, as
# "module.qualname": "why" -- only where something outside tilscore calls them positionally
# (a method overriding a library's API, a callback with a fixed signature). Empty: nothing
# needs it today.
POSITIONAL_ALLOWED: dict[str, str] = {}


def _positional_params(node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool
                       ) -> list[str]:
    """Names of the parameters `node` takes by position (positional-only and
    positional-or-keyword), without the self or cls of a method."""
    names = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    return names[1:] if method and not static and names else names


def _public_functions(body: list[ast.stmt], prefix: str, *, method: bool = False):
    """(qualified name, node) of the public functions and methods in `body`: names not
    starting with ``_`` (so no dunders), in public classes (a private class's methods are
    not public), nested classes included; functions inside functions are not public."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                yield f"{prefix}{node.name}", node, method
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _public_functions(node.body, f"{prefix}{node.name}.", method=True)


def test_public_functions_take_at_most_two_positional_parameters():
    """Every public function with more than two parameters takes the rest by keyword
    (``*`` after the first one or two): a call says what each argument is, and a
    parameter can be added or reordered without silently shifting the callers'."""
    offenders, found = [], set()
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for qualname, node, method in _public_functions(tree.body, f"{name}."):
            params = _positional_params(node, method=method)
            if len(params) <= 2:
                continue
            found.add(qualname)
            if qualname not in POSITIONAL_ALLOWED:
                offenders.append(f"{qualname}({', '.join(params)})  "
                                 f"[{path.relative_to(PACKAGE.parent)}:{node.lineno}]")
    assert not offenders, ("public functions with more than two positional parameters "
                           "(add `*` after the first one or two):\n" + "\n".join(offenders))
    assert set(POSITIONAL_ALLOWED) <= found, (
        f"allow-list entries that no longer need it: {set(POSITIONAL_ALLOWED) - found}")


def _function_imports(tree: ast.Module):
    """The import statements inside functions (at any depth)."""
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_imports_inside_functions_say_why():
    """Imports live at module level unless deferring one is needed: an optional dependency,
    the start-up time of a command or process that does not use it (`tilscore --help`, a
    card read, decode workers...), or an import cycle. Such an import says which in a
    comment on its line, or on the line before it or before its block of imports (e.g.
    ``# lazy: keeps `tilscore --help` fast``, ``# optional dependency (the dicom extra)``)."""
    unexplained = []
    for name, path in sorted(_modules().items()):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(
            io.StringIO(text).readline) if tok.type == tokenize.COMMENT}
        for node in _function_imports(ast.parse(text)):
            said = comments.get(node.lineno, "")
            k = node.lineno - 1  # the comment lines before it or before the imports above it
            while k >= 1:
                line = lines[k - 1].strip()
                if line.startswith("#"):
                    said += line
                elif said or not (line.startswith(("import ", "from ")) or not line):
                    break
                k -= 1
            if not any(word in said for word in ("lazy", "optional", "cycle")):
                unexplained.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not unexplained, ("imports inside functions without a reason (move them to the "
                             "top, or say why: lazy, optional, cycle):\n"
                             + "\n".join(unexplained))
