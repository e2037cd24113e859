"""The pipeline compiles, takes exactly the params sections, and submit/local validate first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from kfp_helpers import REPO, dvc_edges, pipeline_edges

from llm2clip.config import Params, load_params, load_sections
from llm2clip.stages import STAGES
from pipelines import submit
from pipelines.llm2clip_pipeline import PIPELINE_NAME, llm2clip_pipeline, pipeline_arguments

PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "params").glob("*.yaml"))]


def test_pipeline_takes_common_plus_one_section_per_stage(compiled_ir):
    declared = compiled_ir["root"]["inputDefinitions"]["parameters"]
    assert list(llm2clip_pipeline.component_spec.inputs) == ["common", *STAGES]
    assert sorted(declared) == sorted(["common", *STAGES])
    assert set(declared) <= set(Params.__dataclass_fields__)
    assert all(p["parameterType"] == "STRUCT" for p in declared.values())
    assert all("defaultValue" not in p for p in declared.values()), "params come from params.yaml"
    assert all(p.get("description") for p in declared.values())
    assert compiled_ir["pipelineInfo"]["name"] == PIPELINE_NAME


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_gives_pipeline_arguments(path):
    params = load_params(path)
    arguments = pipeline_arguments(params)
    assert list(arguments) == ["common", *STAGES]
    # what a task receives validates back to exactly the same typed sections (nulls dropped:
    # KFP cannot carry them, and every optional field defaults to None)
    assert "null" not in json.dumps(arguments)
    for stage in STAGES:
        cfg, common = load_sections(stage, arguments["common"], arguments[stage])
        assert cfg == params.section(stage) and common == params.common


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


class FakeClient:
    """Records what submit would send to a KFP API server."""

    instances: list["FakeClient"] = []

    def __init__(self, host=None, **kwargs):
        self.host, self.kwargs, self.calls = host, kwargs, []
        FakeClient.instances.append(self)

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        ir = yaml.safe_load(Path(pipeline_file).read_text())
        self.calls.append((ir, kwargs))
        return type("Result", (), {"run_id": "run-123"})()


@pytest.fixture()
def fake_client(monkeypatch):
    import kfp

    FakeClient.instances = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


def test_submit_sends_validated_sections(fake_client, capsys):
    params = REPO / "params" / "full.yaml"
    rc = submit.main(["--host", "http://kfp.invalid", "--params", str(params),
                      "--set", "prepare_data.shard_size=123", "--run-name", "r1", "--no-cache"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "run-123"
    (client,) = fake_client.instances
    assert client.host == "http://kfp.invalid"
    ((ir, kwargs),) = client.calls
    assert ir["pipelineInfo"]["name"] == PIPELINE_NAME
    expected = pipeline_arguments(load_params(params, ["prepare_data.shard_size=123"]))
    assert kwargs["arguments"] == expected and expected["prepare_data"]["shard_size"] == 123
    assert expected["prepare_data"]["sources"][0]["kind"] == "webdataset"  # the file, not defaults
    assert kwargs["experiment_name"] == expected["common"]["experiment"]
    assert kwargs["run_name"] == "r1" and kwargs["enable_caching"] is False


@pytest.mark.parametrize("bad", [["--set", "prepare_data.shard_size=many"],
                                 ["--set", "prepare_data.no_such_key=1"]])
def test_submit_rejects_bad_params_before_connecting(fake_client, bad):
    rc = submit.main(["--host", "http://kfp.invalid", "--params", str(REPO / "params.yaml"), *bad])
    assert rc == 2
    assert fake_client.instances == [], "nothing may be sent for invalid params"


def test_submit_rejects_a_missing_params_file(fake_client, tmp_path):
    assert submit.main(["--host", "http://h", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert fake_client.instances == []


def test_local_rejects_bad_params_before_running(tmp_path):
    from pipelines import local

    rc = local.main(["--params", str(REPO / "params.yaml"), "--set", "common.seed=x",
                     "--pipeline-root", str(tmp_path / "lo")])
    assert rc == 2
    assert not (tmp_path / "lo").exists()
