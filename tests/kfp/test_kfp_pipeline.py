"""The pipeline compiles, takes exactly the params sections, and submit/local validate first."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from kfp import compiler, dsl
from kfp_helpers import REPO, dvc_edges, pipeline_edges

from llm2clip.config import Params, load_params, load_sections
from llm2clip.stages import STAGES
from pipelines.llm2clip_pipeline import PIPELINE_NAME, SECTIONS, llm2clip_pipeline, pipeline_arguments

PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "params").glob("*.yaml"))]


def test_pipeline_takes_common_plus_one_section_per_stage(compiled_ir):
    declared = compiled_ir["root"]["inputDefinitions"]["parameters"]
    assert list(llm2clip_pipeline.component_spec.inputs) == ["common", *STAGES, "eval_data", "image", "gpu_image"]
    sections = {name: p for name, p in declared.items() if name not in ("image", "gpu_image", "eval_data")}
    assert sorted(sections) == sorted(["common", *STAGES]) == sorted(SECTIONS)
    assert set(sections) <= set(Params.__dataclass_fields__)
    assert all(p["parameterType"] == "STRUCT" for p in sections.values())
    assert all("defaultValue" not in p for p in sections.values()), "params come from params.yaml"
    assert declared["image"]["parameterType"] == declared["gpu_image"]["parameterType"] == "STRING"
    assert declared["eval_data"]["parameterType"] == "LIST" and declared["eval_data"]["defaultValue"] == []
    assert all(p.get("description") for p in declared.values())
    assert compiled_ir["pipelineInfo"]["name"] == PIPELINE_NAME


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_gives_pipeline_arguments(path):
    params = load_params(path)
    arguments = pipeline_arguments(params)
    assert list(arguments) == ["common", *STAGES, "eval_data"]
    # what a task receives validates back to exactly the same typed sections (nulls dropped:
    # KFP cannot carry them, and every optional field defaults to None)
    assert "null" not in json.dumps(arguments)
    for stage in STAGES:
        cfg, common = load_sections(stage, arguments["common"], arguments[stage])
        assert cfg == params.section(stage) and common == params.common
    # each eval set's item validates back to the sections `--eval-set NAME` runs with
    assert [item["name"] for item in arguments["eval_data"]] == list(params.eval_data)
    for item in arguments["eval_data"]:
        for stage in ("prepare_data", "embed_captions"):
            assert load_sections(stage, item["common"], item[stage]) == params.eval_set(item["name"], stage)


def test_compile_cli_is_independent_of_the_environment(tmp_path):
    """Compiling reads no environment: two compiles under different env vars are identical."""
    outputs = []
    for i, extra in enumerate([{}, {"MLFLOW_TRACKING_URI": "http://x", "KFP_HOST": "http://y"}]):
        out = tmp_path / f"p{i}.yaml"
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.compile", "--output", str(out)],
            cwd=REPO, env={**os.environ, **extra}, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == str(out)
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


def test_edge_helpers_see_artifact_and_after_edges(tmp_path):
    """The parity test's edge extraction, on a toy two-stage DAG with one data edge and one .after()."""

    @dsl.component(base_image="python:3.11")
    def make(out: dsl.Output[dsl.Dataset]):
        pass

    @dsl.component(base_image="python:3.11")
    def use(data: dsl.Input[dsl.Dataset]):
        pass

    @dsl.pipeline(name="toy")
    def toy():
        first = make().set_display_name("first")
        use(data=first.outputs["out"]).set_display_name("second")
        use(data=first.outputs["out"]).set_display_name("third").after(first)

    compiler.Compiler().compile(toy, str(tmp_path / "toy.yaml"))
    artifacts, tasks = pipeline_edges(yaml.safe_load((tmp_path / "toy.yaml").read_text()))
    assert artifacts == {("first", "second", "data"), ("first", "third", "data")}
    assert tasks == {("first", "second"), ("first", "third")}

    stages = {
        "a": {"cmd": "python -m llm2clip a --params params.yaml --out x", "outs": ["x"]},
        "b": {"cmd": "torchrun --nproc-per-node 2 -m llm2clip b --params params.yaml --out x --y y",
              "deps": ["x/sub", "src.py"], "outs": ["y"]},
    }
    assert dvc_edges(stages) == {("a", "b", "")}


def test_local_rejects_bad_params_before_running(tmp_path):
    from pipelines import local

    rc = local.main(["--params", str(REPO / "params.yaml"), "--set", "common.seed=x",
                     "--pipeline-root", str(tmp_path / "lo")])
    assert rc == 2
    assert not (tmp_path / "lo").exists()
