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
# The per-eval-set runs of a stage: dvc.yaml `foreach` stages and the tasks of the KFP ParallelFor.
EVAL_VARIANTS = {"prepare_eval": "prepare_data", "embed_eval": "embed_captions"}
DEMO_STAGES = {"demo_inputs"}  # writes the demo's ImageNet-style folder; no pipeline stage


def pipeline_stages(dvc_stages: dict) -> dict:
    """The dvc.yaml stages that are pipeline stages (not the eval-set variants or demo inputs)."""
    return {k: v for k, v in dvc_stages.items() if k not in EVAL_VARIANTS and k not in DEMO_STAGES}


def eval_loop(ir: dict) -> tuple[str, dict]:
    """``(root task key, sub-DAG tasks by display name)`` of the eval-set ParallelFor."""
    from pipelines.llm2clip_pipeline import EVAL_LOOP

    (key,) = [k for k, t in ir["root"]["dag"]["tasks"].items() if t["taskInfo"]["name"] == EVAL_LOOP]
    dag = ir["components"][ir["root"]["dag"]["tasks"][key]["componentRef"]["name"]]["dag"]["tasks"]
    return key, {t["taskInfo"]["name"]: t for t in dag.values()}


def test_stage_names_agree_in_order(dvc_stages, compiled_ir):
    from pipelines.llm2clip_pipeline import EVAL_LOOP

    assert list(pipeline_stages(dvc_stages)) == STAGE_NAMES
    assert set(pipeline_tasks(compiled_ir)) == set(STAGE_NAMES) | {EVAL_LOOP}
    assert set(eval_loop(compiled_ir)[1]) == set(EVAL_VARIANTS)
    assert {k for k in dvc_stages if k in EVAL_VARIANTS} == set(EVAL_VARIANTS)
    folders = sorted(p.parent.name for p in (REPO / "components").glob("*/component.py"))
    assert folders == sorted(STAGE_NAMES)


def test_edges_agree(dvc_stages, compiled_ir):
    from pipelines.llm2clip_pipeline import EVAL_LOOP

    registry = registry_edges(STAGES)
    artifact_edges, task_edges = pipeline_edges(compiled_ir)
    assert dvc_edges(pipeline_stages(dvc_stages)) == registry
    # evaluate's collected inputs come out of the eval-set loop; nothing else does
    collected = {(EVAL_LOOP, "evaluate", name) for name in STAGES["evaluate"].collected}
    # ... and the loop takes the caption encoder in (its embed_eval task embeds with it)
    loop_in = {("caption_contrastive", EVAL_LOOP, "pipelinechannel--caption-contrastive-caption_encoder")}
    assert artifact_edges == registry | collected | loop_in
    assert task_edges == {(producer, consumer) for producer, consumer, _ in registry | collected | loop_in}


def _container(ir: dict, task: dict) -> dict:
    executor = ir["components"][task["componentRef"]["name"]]["executorLabel"]
    return ir["deploymentSpec"]["executors"][executor]["container"]


def test_eval_variants_agree(dvc_stages, compiled_ir):
    """prepare_eval / embed_eval run the same stage (CLI, component) as their stage, with --eval-set,
    and feed evaluate's collected inputs in both systems."""
    _, loop = eval_loop(compiled_ir)
    folder = {"prepare_eval": "data/eval", "embed_eval": "data/eval_embeddings"}
    for variant, stage in EVAL_VARIANTS.items():
        dvc = dvc_stages[variant]
        assert dvc["foreach"] == "${eval_data}"
        launcher, cmd_stage, flags = parse_dvc_cmd(dvc["do"]["cmd"])
        assert (launcher, cmd_stage, flags.pop("--eval-set")) == (["python"], stage, "${key}")
        assert flags.pop("--params") == "params.yaml"
        spec = STAGES[stage]
        assert {f[2:].replace("-", "_") for f in flags} == set(spec.inputs + spec.outputs)
        (out,) = spec.outputs
        assert dvc["do"]["outs"] == [flags[f"--{out.replace('_', '-')}"]] == [f"{folder[variant]}/${{key}}"]
        assert "eval_data.${key}" in dvc["do"]["params"]
        assert f"llm2clip/stages/{stage}.py" in dvc["do"]["deps"]
        # the same component, fed the sections derived for the loop item
        task = loop[variant]
        assert _container(compiled_ir, task) == _container(compiled_ir, pipeline_tasks(compiled_ir)[stage])
        params = task["inputs"]["parameters"]
        assert params["common"]["componentInputParameter"] == "pipelinechannel--eval_data-loop-item"
        assert params["common"]["parameterExpressionSelector"] == 'parseJson(string_value)["common"]'
        assert params["config"]["parameterExpressionSelector"] == f'parseJson(string_value)["{stage}"]'
    evaluate_flags = parse_dvc_cmd(dvc_stages["evaluate"]["cmd"])[2]
    assert evaluate_flags["--eval-data"] == "data/eval"
    assert evaluate_flags["--eval-embeddings"] == "data/eval_embeddings"
    assert {"data/eval", "data/eval_embeddings"} <= set(dvc_stages["evaluate"]["deps"])
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
    assert set(names) == set(spec.inputs + spec.outputs + spec.collected)
    assert {names[i] for i in spec.inputs} <= set(map(str, dvc.get("deps", [])))
    assert sorted(names[o] for o in spec.outputs) == sorted(map(str, dvc["outs"]))
    assert f"llm2clip/stages/{stage}.py" in dvc["deps"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_component_interface_matches_registry(stage):
    comp = component(stage)
    spec = STAGES[stage]
    inputs, outputs = comp.component_spec.inputs or {}, comp.component_spec.outputs or {}
    launcher = {"num_nodes", "trainjob_image"} if stage in TRAINING_STAGES else set()
    assert set(inputs) == {"common", "config", *launcher, *spec.inputs, *spec.collected}
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
        for name in STAGES[stage].inputs + STAGES[stage].outputs + STAGES[stage].collected:
            assert f'"{name}": {name}' in source
        assert len(source.splitlines()) <= 60, f"components/{stage}/component.py: interface only"
