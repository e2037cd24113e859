"""Which files of ``llm2clip/`` a pipeline stage runs: a static walk of its imports.

A stage runs ``python -m llm2clip <stage>``, i.e. ``llm2clip/__init__.py``, ``llm2clip/__main__.py``
and, through the stage table (``StageSpec.module``), ``llm2clip/stages/<stage>.py``. From there the
walk follows every import of an ``llm2clip`` module, wherever it is written: at the top of a file
or inside a function (heavy modules are imported lazily), plain, ``from`` or relative, plus
``importlib.import_module`` / ``__import__`` calls. Importing ``a.b.c`` runs ``a/__init__.py``
and ``a/b/__init__.py`` too, and ``from a.b import c`` imports ``a/b/c.py`` when ``c`` is a
submodule. The walk is conservative: an import inside a function counts even if that function
never runs for the stage (a needless rerun is cheap, a stale output is not).

One exception keeps the walk useful: a package's module-level ``__getattr__`` (PEP 562, how
``llm2clip/__init__.py`` exports ``LLM2CLIPModel`` without importing torch) runs only when a name
it serves is read. Its imports count for a stage only if a file of the stage's closure mentions
one of the names it compares against (as an identifier, attribute or string).

A dynamic import whose name is an f-string is the stage table's ``llm2clip.stages.{name}``: every
placeholder stands for the stage being run, so a stage's closure holds its own stage module only.
A dynamic import that cannot be resolved that way raises :class:`UnresolvedImport`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llm2clip"


class UnresolvedImport(Exception):
    """A dynamic import inside the package whose target the walker cannot determine."""


def module_file(name: str, root: Path = REPO) -> Path | None:
    """``llm2clip.a.b`` -> ``llm2clip/a/b.py`` or ``llm2clip/a/b/__init__.py`` (relative), if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module a ``from ... import`` reads from, with relative levels resolved."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]  # a plain module's package is its parent
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _dynamic_target(call: ast.Call, path: Path, stage: str) -> str | None:
    """The module named by ``importlib.import_module(...)`` / ``__import__(...)``, else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in {"import_module", "__import__"} or not call.args:
        return None
    arg = call.args[0]
    where = f"{path}:{call.lineno}"
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        pieces = []
        for value in arg.values:
            if isinstance(value, ast.Constant):
                pieces.append(str(value.value))
            else:  # the stage table's {self.name}: the stage being run
                pieces.append(stage)
        target = "".join(pieces)
        if target.startswith(PACKAGE + ".") and module_file(target) is None:
            raise UnresolvedImport(f"{where}: {ast.unparse(arg)} with the stage name gives {target}, no such module")
        return target
    raise UnresolvedImport(f"{where}: cannot tell which module {ast.unparse(call)} imports")


@cache
def _parsed(path: Path, root: Path) -> ast.Module:
    return ast.parse((root / path).read_text(), filename=str(path))


def _lazy_getattr(path: Path, root: Path) -> ast.FunctionDef | None:
    """A package's module-level ``__getattr__`` (PEP 562), if it has one."""
    if path.name != "__init__.py":
        return None
    for node in _parsed(path, root).body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return node
    return None


def _imports(nodes: list[ast.AST], path: Path, stage: str, root: Path) -> set[Path]:
    names: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path)
            names.update(_with_parents(base))
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            target = _dynamic_target(node, path, stage)
            if target:
                names.update(_with_parents(target))
    # `from a import b` with b a function, not a module: module_file(a.b) is None, dropped here.
    return {f for f in (module_file(n, root) for n in names) if f is not None}


def direct_imports(path: Path, stage: str, root: Path = REPO) -> set[Path]:
    """The package files that importing ``path`` (relative to ``root``) can run directly.

    Leaves out what a package's ``__getattr__`` imports (see :func:`lazy_exports`).
    """
    lazy = _lazy_getattr(path, root)
    return _imports([n for n in _parsed(path, root).body if n is not lazy], path, stage, root)


def lazy_exports(path: Path, stage: str, root: Path = REPO) -> tuple[set[str], set[Path]]:
    """(names served, files imported) by the package ``__getattr__`` of ``path``; empty without one."""
    lazy = _lazy_getattr(path, root)
    if lazy is None:
        return set(), set()
    compared = [c for n in ast.walk(lazy) if isinstance(n, ast.Compare) for c in ast.walk(n)]
    served = {c.value for c in compared if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return served, _imports([lazy], path, stage, root)


@cache
def mentioned(path: Path, root: Path = REPO) -> set[str]:
    """Every identifier, attribute, imported name and string constant in ``path``."""
    found: set[str] = set()
    for node in ast.walk(_parsed(path, root)):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.update((node.name.rpartition(".")[2], node.asname or ""))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def entry_points(stage: str) -> list[Path]:
    """What ``python -m llm2clip <stage>`` runs first; the stage module comes via the stage table."""
    return [Path(PACKAGE, "__init__.py"), Path(PACKAGE, "__main__.py")]


def stage_closure(stage: str, root: Path = REPO) -> set[Path]:
    """Every file of the package that ``python -m llm2clip <stage>`` may execute (relative paths)."""
    seen: set[Path] = set()
    todo = list(entry_points(stage))
    while todo:
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo.extend(direct_imports(path, stage, root) - seen)
        for package in seen:
            served, files = lazy_exports(package, stage, root)
            if files - seen and any(served & mentioned(f, root) for f in seen if f != package):
                todo.extend(files - seen)
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    """True when a dep is ``path`` itself or a directory above it."""
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


def code_deps(deps: list[str]) -> list[str]:
    """The deps of a dvc.yaml stage that are code (inside the package)."""
    return [d for d in deps if Path(d).parts[:1] == (PACKAGE,)]
