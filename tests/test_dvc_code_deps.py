"""dvc.yaml's code deps cover every llm2clip/ module each stage imports, so DVC never calls a stale
output up to date after a code change.

The import closure of a stage comes from a static walk (tests/code_deps.py): what
``python -m llm2clip <stage>`` runs, following every import inside the package, lazy ones too.
The last tests prove it with the real ``dvc`` CLI on a copy of the repo.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from code_deps import REPO, UnresolvedImport, code_deps, covered, direct_imports, stage_closure
from test_dvc import dvc, run

from llm2clip.stages import STAGES

DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
EVAL_SETS = list(yaml.safe_load((REPO / "params.yaml").read_text())["eval_data"])
# dvc.yaml stages that are no pipeline stage: the per-eval-set runs (foreach) and the demo's inputs
EVAL_VARIANTS = {"prepare_eval": "prepare_data", "embed_eval": "embed_captions"}
DEMO_INPUTS = "demo_inputs"  # python -m llm2clip.data.demo_folder


def closures() -> dict[str, set[Path]]:
    return {stage: stage_closure(stage) for stage in STAGES}


def demo_inputs_closure() -> set[Path]:
    """What ``python -m llm2clip.data.demo_folder`` may execute."""
    seen: set[Path] = set()
    todo = [Path("llm2clip/__init__.py"), Path("llm2clip/data/__init__.py"), Path("llm2clip/data/demo_folder.py")]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(direct_imports(path, DEMO_INPUTS) - seen)
    return seen


def importers(module: str) -> set[str]:
    """The dvc.yaml stages (foreach ones per eval set) whose import closure holds ``module``."""
    stages = {stage for stage, files in closures().items() if Path(module) in files}
    stages |= {f"{variant}@{key}" for variant, base in EVAL_VARIANTS.items() if base in stages for key in EVAL_SETS}
    return stages | ({DEMO_INPUTS} if Path(module) in demo_inputs_closure() else set())


def all_outs() -> list[str]:
    """Every out of dvc.yaml, a foreach stage's once per eval set of params.yaml."""
    outs = []
    for spec in DVC_STAGES.values():
        if "foreach" in spec:
            outs += [o.replace("${key}", key) for o in spec["do"]["outs"] for key in EVAL_SETS]
        else:
            outs += spec["outs"]
    return outs


def test_demo_inputs_deps_cover_what_it_imports():
    deps = code_deps(DVC_STAGES[DEMO_INPUTS]["deps"])
    assert not [str(p) for p in demo_inputs_closure() if not covered(p, deps)]


def test_every_imported_module_is_a_dep():
    missing = {
        stage: sorted(str(p) for p in files if not covered(p, code_deps(DVC_STAGES[stage]["deps"])))
        for stage, files in closures().items()
    }
    missing = {stage: paths for stage, paths in missing.items() if paths}
    report = "\n".join(
        f"{stage}: add to its deps in dvc.yaml:\n" + "\n".join(f"      - {p}" for p in paths)
        for stage, paths in missing.items()
    )
    assert not missing, f"modules a stage imports but no dvc.yaml dep covers:\n{report}"


@pytest.mark.parametrize(("variant", "stage"), [("prepare_eval", "prepare_data"), ("embed_eval", "embed_captions")])
def test_eval_set_variants_depend_on_their_stage_code(variant, stage):
    """``prepare_eval@NAME`` / ``embed_eval@NAME`` run ``<stage> --eval-set NAME``: the same code."""
    assert DVC_STAGES[variant]["foreach"] == "${eval_data}"
    assert sorted(code_deps(DVC_STAGES[variant]["do"]["deps"])) == sorted(code_deps(DVC_STAGES[stage]["deps"]))


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_exist(stage):
    absent = [d for d in code_deps(DVC_STAGES[stage]["deps"]) if not (REPO / d).exists()]
    assert not absent, f"{stage}: dvc.yaml deps on paths that do not exist: {absent}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_not_the_whole_package(stage):
    assert "llm2clip" not in {str(Path(d)) for d in DVC_STAGES[stage]["deps"]}, (
        f"{stage}: depend on the modules it imports, not on all of llm2clip/ (every change would rerun it)")


def test_the_walk_sees_lazy_and_dynamic_imports():
    """Guards against a walker that finds nothing: facts of today's code it must see."""
    for stage, files in closures().items():
        stage_modules = {p.name for p in files if p.parent == Path("llm2clip/stages")}
        # the stage table imports `llm2clip.stages.{name}`: the stage's own module (and its `_io` half)
        own = {"__init__.py", f"{stage}.py"}
        assert own <= stage_modules <= own | {f"{stage}_io.py"}, stage
        assert {Path("llm2clip/__init__.py"), Path("llm2clip/cli.py"), Path("llm2clip/config/__init__.py")} <= files
    assert Path("llm2clip/registry.py") in stage_closure("evaluate")  # imported inside a function
    # llm2clip/__init__.py imports vision.model only in its PEP 562 __getattr__, which the data
    # stage never calls.
    assert not any(p.parts[1] == "vision" for p in stage_closure("prepare_data"))
    assert Path("llm2clip/vision/model.py") in direct_imports(Path("llm2clip/pyfunc.py"), "register")


def test_an_undeterminable_dynamic_import_is_an_error(tmp_path):
    (tmp_path / "llm2clip").mkdir()
    (tmp_path / "llm2clip" / "__init__.py").write_text(
        "import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n")
    with pytest.raises(UnresolvedImport, match="cannot tell"):
        direct_imports(Path("llm2clip/__init__.py"), "prepare_data", root=tmp_path)


# ---- the real DVC ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A copy of the repo with every stage up to date, without running the pipeline.

    Each out is a placeholder folder; `dvc commit -f` records the deps as they are in dvc.lock.
    """
    clone = tmp_path_factory.mktemp("code_deps") / "repo"
    listed = run(["git", "ls-files", "-z", "-co", "--exclude-standard"], REPO).split("\0")
    for name in filter(None, listed):
        if name != "dvc.lock" and (REPO / name).is_file():  # a local dvc.lock would be stale
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    run(["git", "init", "-q"], clone)
    if not (clone / ".dvc" / "config").is_file():
        dvc(["init", "-q"], clone)
    for out in all_outs():
        (clone / out).mkdir(parents=True, exist_ok=True)
        (clone / out / "placeholder.txt").write_text(out)
    dvc(["commit", "-f", "-q"], clone)
    assert json.loads(dvc(["status", "--json"], clone)) == {}
    return clone


def edit_status(clone: Path, module: str, old: str, new: str) -> dict:
    """`dvc status --json` after replacing ``old`` by ``new`` in ``module``; then puts it back."""
    path = clone / module
    original = path.read_text()
    assert original.count(old) == 1, f"{module}: {old!r} is not there once; pick another edit"
    path.write_text(original.replace(old, new))
    try:
        return json.loads(dvc(["status", "--json"], clone))
    finally:
        path.write_text(original)


EDITS = [
    # (module, text, replacement): a change in behaviour, not only in a comment
    ("llm2clip/eval/zeroshot.py", "import logging", "import logging  # changed"),
    ("llm2clip/eval/harness.py", "import logging", "import logging  # changed"),
    ("llm2clip/train/vision_trainer.py", "from __future__ import annotations",
     "from __future__ import annotations  # changed"),
    ("llm2clip/data/collect.py", "import logging", "import logging  # changed"),
]


@pytest.mark.parametrize(("module", "old", "new"), EDITS, ids=[m for m, *_ in EDITS])
def test_dvc_status_lists_exactly_the_stages_that_import_a_changed_module(committed, module, old, new):
    """`dvc status` reports a stage when its own deps (or outs/params/cmd) changed; it does not
    propagate: a stage downstream of an out-of-date one is listed only if its own deps changed
    (the upstream out on disk is still what dvc.lock recorded). So after editing one module the
    stages listed are exactly those with a dep covering it, which must be the stages importing it.
    """
    status = edit_status(committed, module, old, new)
    expected = importers(module)
    assert expected, f"no stage imports {module}; pick another module"
    assert set(status) == expected, f"{module}: dvc status lists {sorted(status)}, importers {sorted(expected)}"
    for stage, changes in status.items():
        changed = {dep for change in changes for dep in change.get("changed deps", {})}
        assert changed and all(dep.startswith("llm2clip/") for dep in changed), (stage, changes)
        assert all(set(change) == {"changed deps"} for change in changes), (stage, changes)
    assert json.loads(dvc(["status", "--json"], committed)) == {}, "the edit was not undone"


def test_a_config_default_marks_every_stage(committed):
    """The issue's own check: a default in llm2clip/config/common.py changes every stage that imports it."""
    every = set(STAGES) | {f"{v}@{key}" for v in EVAL_VARIANTS for key in EVAL_SETS} | {DEMO_INPUTS}
    assert importers("llm2clip/config/common.py") == every
    status = edit_status(committed, "llm2clip/config/common.py", "seed: int = 0", "seed: int = 1")
    assert set(status) == every
