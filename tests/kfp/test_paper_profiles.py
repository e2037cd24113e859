"""The paper profiles (params/paper-*.yaml) go through what ``python -m pipelines.submit`` does
before it sends anything: validate, fit the gpu cluster profile, compile the pipeline, build the
run's arguments; and every section comes back unchanged through a KFP Struct parameter."""

import pytest
import yaml
from google.protobuf import json_format, struct_pb2
from kfp_helpers import REPO

from llm2clip.config import load_params, load_sections
from llm2clip.stages import STAGES
from pipelines import submit

PAPER_PROFILES = sorted((REPO / "params").glob("paper-*.yaml"))


def test_there_are_paper_profiles():
    assert {p.name for p in PAPER_PROFILES} >= {"paper-openai-l14-336.yaml", "paper-eva02-l14-336.yaml"}


def through_struct(section: dict) -> dict:
    """What a KFP task receives for a dict parameter: a protobuf Struct, every number a double."""
    struct = struct_pb2.Struct()
    struct.update(section)
    return json_format.MessageToDict(struct)


@pytest.mark.parametrize("path", PAPER_PROFILES, ids=lambda p: p.name)
def test_paper_profile_compiles_for_the_gpu_cluster(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2CLIP_GIT_REV", "0123456789abcdef0123456789abcdef01234567")
    args = submit.build_parser().parse_args(
        ["--params", str(path), "--cluster", "gpu", "--pipeline-root", "s3://bucket/pipeline-root"])
    plan = submit.prepare(args, tmp_path)  # validates, check_fit (8 processes per 8-GPU node), compiles

    spec, _platform = yaml.safe_load_all(plan.package.read_text())
    declared = spec["root"]["inputDefinitions"]["parameters"]
    sections = {name for name, p in declared.items() if p["parameterType"] == "STRUCT"}
    assert sections == {"common", *STAGES} and set(plan.arguments) >= sections
    assert "nvidia.com/gpu" in plan.package.read_text()  # really placed by the gpu profile
    assert plan.experiment == load_params(path).common.experiment

    params = load_params(path)
    common = through_struct(plan.arguments["common"])
    for stage in STAGES:
        cfg, got_common = load_sections(stage, common, through_struct(plan.arguments[stage]))
        assert cfg == params.section(stage), stage
        assert got_common == params.common
