"""The import "nevers" of the library, read from the source (``ast``; nothing is imported).

Every module under ``llm2clip/`` is parsed and every import collected, wherever it is written (at
the top or inside a function: heavy imports are lazy here), absolute, ``from`` or relative, plus
``importlib.import_module("...")`` / ``__import__("...")`` with a constant (or f-string prefix)
name. The rules (docs/ARCHITECTURE.md, "Layout"):

(a) ``llm2clip.vision`` never imports ``llm2clip.text``, and ``llm2clip.text`` never imports
    ``llm2clip.vision``; what needs both sits above them (``llm2clip/clip_model.py``,
    ``llm2clip/pyfunc.py``, the stages);
(b) no building block imports a stage: only ``llm2clip/stages/``, ``llm2clip/cli.py``,
    ``llm2clip/__main__.py`` and ``llm2clip/cluster/`` may import ``llm2clip.stages``;
(c) the library never imports ``kfp`` or ``dvc`` (``pipelines/`` and ``components/`` do), with
    one exception: the modules in ``MAY_IMPORT_DVC_LAZILY`` may import ``dvc`` inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llm2clip"

# (importer, imported, why): an importer inside the first may not import anything inside the second.
SEPARATE = [
    ("llm2clip.vision", "llm2clip.text", "vision never imports text"),
    ("llm2clip.text", "llm2clip.vision", "text never imports vision"),
]
STAGES = "llm2clip.stages"
MAY_IMPORT_STAGES = ("llm2clip.stages", "llm2clip.cli", "llm2clip.__main__", "llm2clip.cluster")
ORCHESTRATORS = ("kfp", "dvc")  # and their kin: kfp_server_api, dvclive, dvc_objects, ...
# The one exception to (c): the ``dvc`` source kind of prepare_data reads a git + DVC repository at
# a revision through DVC's own Python API (``dvc.api.DVCFileSystem``), the only reader that knows
# DVC's remotes and cache. Inside a function only, so importing the library never imports dvc.
MAY_IMPORT_DVC_LAZILY = ("llm2clip.data.dvc_source",)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. llm2clip.vision.model
    path: str  # its file, relative to the root
    line: int
    name: str  # what it imports, absolute, e.g. llm2clip.text.loading (or llm2clip.text.loading.looks_local)
    lazy: bool = False  # written inside a function (runs when it is called, not on import)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.name}"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _dynamic(call: ast.Call) -> str | None:
    """The constant module name (or an f-string's constant prefix) of ``import_module`` / ``__import__``."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".") or None
    return None


def imports_of(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import written in every module under ``root/package`` (the import graph's edges).

    ``from a import b`` gives both ``a`` and ``a.b`` (``b`` may be a submodule).
    """
    edges: list[Import] = []
    for file in sorted((root / package).rglob("*.py")):
        rel = file.relative_to(root)
        module = _module_name(rel)
        tree = ast.parse(file.read_text(), filename=str(rel))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, file.name == "__init__.py")
                names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
            elif isinstance(node, ast.Call) and (target := _dynamic(node)):
                names = [target]
            edges.extend(Import(module, str(rel), node.lineno, name, id(node) in inside) for name in names if name)
    return edges


def _broken_rules(edge: Import) -> list[str]:
    rules = [why for importer, imported, why in SEPARATE
             if _within(edge.module, importer) and _within(edge.name, imported)]
    if _within(edge.name, STAGES) and not any(_within(edge.module, m) for m in MAY_IMPORT_STAGES):
        rules.append(f"a building block imports a stage; only {', '.join(MAY_IMPORT_STAGES)} may")
    top = edge.name.split(".")[0]
    allowed = top == "dvc" and edge.lazy and edge.module in MAY_IMPORT_DVC_LAZILY
    if (top in ORCHESTRATORS or top.startswith(tuple(f"{o}_" for o in ORCHESTRATORS)) or top == "dvclive") \
            and not allowed:
        rules.append("the library never imports kfp or dvc")
    return rules


def violations(root: Path, package: str = PACKAGE) -> list[str]:
    """Each import statement under ``root/package`` that breaks a never, as
    ``path:line: <module> imports <names> (<rule>)``."""
    found: dict[tuple[str, int, str, str], list[str]] = {}
    for edge in imports_of(root, package):
        for why in _broken_rules(edge):
            found.setdefault((edge.path, edge.line, edge.module, why), []).append(edge.name)
    lines = []
    for (path, line, module, why), names in sorted(found.items()):
        # `from a import b` gave a and a.b: name the most precise ones
        names = sorted({n for n in names if not any(o.startswith(n + ".") for o in names)})
        lines.append(f"{path}:{line}: {module} imports {', '.join(names)} ({why})")
    return lines


# ---------------------------------------------------------------------------------------- tests


# Known breaks, each to be fixed by the owner of the file (then deleted here: the test fails on a
# listed break that is gone, so this list cannot go stale).
KNOWN: set[str] = set()  # forbidden imports accepted for now, each with its reason and fix


def test_the_library_keeps_its_nevers():
    found = set(violations(REPO))
    assert not found - KNOWN, "forbidden imports in llm2clip/:\n" + "\n".join(sorted(found - KNOWN))
    assert not KNOWN - found, "fixed (delete from KNOWN):\n" + "\n".join(sorted(KNOWN - found))


def test_the_graph_sees_the_imports_it_must():
    """Guards against a parser that finds nothing: facts of today's code, lazy imports included."""
    edges = {(e.module, e.name) for e in imports_of(REPO)}
    assert ("llm2clip.cli", "llm2clip.stages") in edges
    assert ("llm2clip.vision.model", "llm2clip.vision.towers") in edges
    assert ("llm2clip.stages.evaluate", "llm2clip.registry") in edges  # inside a function
    assert any(m == "llm2clip.clip_model" and n.startswith("llm2clip.text.") for m, n in edges)
    assert any(m.startswith("llm2clip.") and n == "torch" for m, n in edges)
    gone = [m for m in MAY_IMPORT_STAGES if not any(_within(module, m) for module, _ in edges)]
    assert not gone, f"{gone} import nothing (gone?): update MAY_IMPORT_STAGES"
    lazy_dvc = {e.module for e in imports_of(REPO) if e.name.split(".")[0] == "dvc" and e.lazy}
    assert lazy_dvc == set(MAY_IMPORT_DVC_LAZILY), f"update MAY_IMPORT_DVC_LAZILY: dvc is imported by {lazy_dvc}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_catches_each_forbidden_import(tmp_path):
    _write(tmp_path, {
        "llm2clip/__init__.py": "",
        "llm2clip/cli.py": "from llm2clip.stages import STAGES\n",  # allowed
        "llm2clip/stages/__init__.py": "import importlib\n\ndef load(n):\n"
                                       "    return importlib.import_module(f'llm2clip.stages.{n}')\n",
        "llm2clip/text/__init__.py": "",
        "llm2clip/text/encoder.py": "import torch\n",
        "llm2clip/vision/__init__.py": "",
        "llm2clip/vision/ok.py": "from . import towers\nfrom llm2clip.io import x\n",
        # relative, two levels up, inside a function: still an edge vision -> text
        "llm2clip/vision/model.py": "def encode(texts):\n    from ..text import encoder\n    return encoder\n",
        "llm2clip/text/loading.py": "import llm2clip.vision.towers as t\n",
        "llm2clip/data/sources.py": "from llm2clip.stages.prepare_data import run\n",
        "llm2clip/tracking.py": "def f():\n    import kfp.dsl\n    from dvc.api import params_show\n",
        # the dvc source may import dvc inside a function only, and nothing else of the kind
        "llm2clip/data/dvc_source.py": "import dvc.exceptions\n\ndef read(repo):\n    from dvc.api import "
                                       "DVCFileSystem\n    import kfp\n    return DVCFileSystem(repo)\n",
    })
    found = violations(tmp_path)
    assert sorted(found) == sorted([
        "llm2clip/data/dvc_source.py:1: llm2clip.data.dvc_source imports dvc.exceptions (the library never "
        "imports kfp or dvc)",
        "llm2clip/data/dvc_source.py:5: llm2clip.data.dvc_source imports kfp (the library never imports kfp or dvc)",
        "llm2clip/data/sources.py:1: llm2clip.data.sources imports llm2clip.stages.prepare_data.run (a "
        "building block imports a stage; only llm2clip.stages, llm2clip.cli, llm2clip.__main__, "
        "llm2clip.cluster may)",
        "llm2clip/text/loading.py:1: llm2clip.text.loading imports llm2clip.vision.towers (text never "
        "imports vision)",
        "llm2clip/tracking.py:2: llm2clip.tracking imports kfp.dsl (the library never imports kfp or dvc)",
        "llm2clip/tracking.py:3: llm2clip.tracking imports dvc.api.params_show (the library never imports "
        "kfp or dvc)",
        "llm2clip/vision/model.py:2: llm2clip.vision.model imports llm2clip.text.encoder (vision never "
        "imports text)",
    ]), "\n".join(found)
