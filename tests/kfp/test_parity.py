"""dvc.yaml == compiled pipeline == stage registry: names, order, edges, params, flags, interfaces.

Edges are ``(producer, consumer, artifact name)`` triples, derived independently per system:
- DVC: a stage's dep is (or lies inside) another stage's out; the name is the consumer's flag
  that carries that path.
- pipeline IR: ``inputs.artifacts[name].taskOutputArtifact.producerTask``; ``dependentTasks``
  (data or ``.after()``) must add no edge DVC lacks.
- registry: a stage's input is named like an earlier stage's output.
"""

from pathlib import Path

import pytest
from kfp_helpers import (
    REPO,
    dvc_edges,
    parse_dvc_cmd,
    pipeline_edges,
    pipeline_tasks,
    registry_edges,
)

from components import component
from llm2clip.cluster.profile import TRAINING_STAGES
from llm2clip.stages import STAGES

STAGE_NAMES = list(STAGES)


def test_stage_names_agree_in_order(dvc_stages, compiled_ir):
    assert list(dvc_stages) == STAGE_NAMES
    assert set(pipeline_tasks(compiled_ir)) == set(STAGE_NAMES)
    folders = sorted(p.parent.name for p in (REPO / "components").glob("*/component.py"))
    assert folders == sorted(STAGE_NAMES)


def test_edges_agree(dvc_stages, compiled_ir):
    registry = registry_edges(STAGES)
    artifact_edges, task_edges = pipeline_edges(compiled_ir)
    assert dvc_edges(dvc_stages) == registry
    assert artifact_edges == registry
    assert task_edges == {(producer, consumer) for producer, consumer, _ in registry}
    # Every input is produced upstream, so the registry order is a valid run order.
    produced = {o for spec in STAGES.values() for o in spec.outputs}
    for spec in STAGES.values():
        assert set(spec.inputs) <= produced, f"{spec.name}: inputs nobody produces"


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_dvc_stage_matches_registry(dvc_stages, stage):
    spec, dvc = STAGES[stage], dvc_stages[stage]
    assert dvc["params"] == ["common", stage]
    launcher, cmd_stage, flags = parse_dvc_cmd(dvc["cmd"])
    assert launcher == ["python"] or launcher[0] == "torchrun", dvc["cmd"]
    assert cmd_stage == stage
    assert flags.pop("--params") == "params.yaml"
    names = {flag[2:].replace("-", "_"): path for flag, path in flags.items()}
    assert set(names) == set(spec.inputs + spec.outputs)
    assert {names[i] for i in spec.inputs} <= set(map(str, dvc.get("deps", [])))
    assert sorted(names[o] for o in spec.outputs) == sorted(map(str, dvc["outs"]))
    assert f"llm2clip/stages/{stage}.py" in dvc["deps"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_component_interface_matches_registry(stage):
    comp = component(stage)
    spec = STAGES[stage]
    inputs, outputs = comp.component_spec.inputs or {}, comp.component_spec.outputs or {}
    launcher = {"num_nodes", "trainjob_image"} if stage in TRAINING_STAGES else set()
    assert set(inputs) == {"common", "config", *launcher, *spec.inputs}
    extra = {"metrics", "report_html", "report_markdown"} if stage == "evaluate" else set()
    assert set(outputs) == set(spec.outputs) | extra
    assert inputs["common"].type == inputs["config"].type == "Dict"
    if launcher:  # defaults run the stage in the task's own pod
        assert inputs["num_nodes"].default == 1 and inputs["trainjob_image"].default == ""
    for name in spec.inputs:
        assert inputs[name].type.startswith("system."), f"{name} must be an Input artifact"
    for name in spec.outputs:
        assert outputs[name].type.startswith("system."), f"{name} must be an Output artifact"
    # The KFP UI shows these descriptions; KFP takes them from the docstring (outputs: Returns).
    undocumented = [n for n, s in {**inputs, **outputs}.items() if not (s.description or "").strip()]
    assert not undocumented, f"{stage}: document {undocumented} in the component docstring"
    assert comp.description


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_pipeline_task_wiring(compiled_ir, stage):
    task = pipeline_tasks(compiled_ir)[stage]
    params = task["inputs"]["parameters"]
    assert params["common"] == {"componentInputParameter": "common"}
    assert params["config"] == {"componentInputParameter": stage}
    assert "pipeline_run_id" not in params, "a run id parameter would defeat the cache"
    executor = compiled_ir["components"][task["componentRef"]["name"]]["executorLabel"]
    container = compiled_ir["deploymentSpec"]["executors"][executor]["container"]
    assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    # Nothing is pip-installed at task start (kfp.local would install it into this venv).
    assert "pip install" not in " ".join(container["command"] + container.get("args", []))


def test_component_bodies_call_their_stage():
    for stage in STAGE_NAMES:
        source = Path(component(stage).python_func.__code__.co_filename).read_text()
        assert "from llm2clip.cluster.task import" in source
        assert f'run_task("{stage}", common, config,' in source
        for name in STAGES[stage].inputs + STAGES[stage].outputs:
            assert f'"{name}": {name}' in source
        assert len(source.splitlines()) <= 60, f"components/{stage}/component.py: interface only"
