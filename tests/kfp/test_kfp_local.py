"""The whole pipeline under kfp.local runs the same code as the CLI / dvc repro, bit for bit.

A real run of all six stages: ``python -m pipelines.local`` in a subprocess (SubprocessRunner,
this venv) on tiny data and tiny models (tests/tiny_pipeline.py), MLflow tracking into a temp
sqlite file. The run fans prepare_data and embed_captions out over 2 group tasks each (a cluster
profile with ``shard_groups: 2``, ``--cluster``): what the stages write is still the CLI's.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp_helpers import REPO, fanout_profile
from tiny_pipeline import write_tiny_params

from llm2clip.stages import STAGES


def small_overrides(tracking_uri: str) -> list[str]:
    return ["common.tracking=true", f"common.tracking_uri={tracking_uri}"]


def run_module(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # components/ and pipelines/ are not installed
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One kfp.local run of the whole pipeline; yields (run dir, tracking URI, overrides)."""
    tmp = tmp_path_factory.mktemp("kfp_local")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sets = small_overrides(uri)
    params = write_tiny_params(tmp)
    cluster = fanout_profile(tmp, {"prepare_data": 2, "embed_captions": 2})
    proc = run_module(["pipelines.local", "--params", str(params), "--cluster", str(cluster),
                       *[a for s in sets for a in ("--set", s)], "--pipeline-root", str(tmp / "lo")],
                      cwd=tmp)
    run_dir = tmp / "lo" / proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    assert run_dir.is_dir() and run_dir.name.startswith("llm2clip-")
    return run_dir, uri, sets, params


def test_every_stage_output_has_a_manifest(local_run):
    from pipelines.local import stage_outputs

    run_dir, _, _, _ = local_run
    for stage, outputs in stage_outputs(run_dir).items():
        for name, path in outputs.items():
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["stage"] == stage, f"{stage}.{name}"
    data = json.loads((run_dir / "prepare-data-merge" / "data" / "manifest.json").read_text())
    assert data["counts"]["train"] + data["counts"]["val"] > 0
    assert data["counts"]["seen"] == 48
    registration = json.loads((run_dir / "register" / "registration" / "registration.json").read_text())
    assert registration["champion_uri"] == "models:/llm2clip-tiny@champion"


def test_kfp_run_equals_a_cli_run(local_run, tmp_path):
    """Same params -> the same shards, byte for byte, from `llm2clip prepare_data` and the task."""
    run_dir, _, sets, params = local_run  # the same sets, tracking URI included: common is hashed
    direct = tmp_path / "data"
    run_module(["llm2clip", "prepare_data", "--params", str(params),
                *[a for s in sets for a in ("--set", s)], "--data", str(direct)], cwd=tmp_path)
    kfp_manifest = json.loads((run_dir / "prepare-data-merge" / "data" / "manifest.json").read_text())
    cli_manifest = json.loads((direct / "manifest.json").read_text())
    assert kfp_manifest["shards"] == cli_manifest["shards"]
    assert kfp_manifest["config_hash"] == cli_manifest["config_hash"]


def test_tasks_are_tagged_with_the_local_pipeline_run_id(local_run):
    """pipelines.local gives every task one run id through $LLM2CLIP_PIPELINE_RUN_ID (on a cluster the
    pod's pipeline/runid label does); it is no task parameter, so it never enters a cache key."""
    from mlflow.tracking import MlflowClient

    _, uri, _, params = local_run
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments, filter_string="tags.`llm2clip.stage` != 'pipeline'")
            if "llm2clip.pipeline_run_id" in r.data.tags]  # not the CLI run of the test above
    eval_sets = len(yaml.safe_load(params.read_text())["eval_data"])  # each: prepare_data + embed_captions
    expected = [*STAGES, *["prepare_data", "embed_captions"] * eval_sets]
    assert sorted(r.data.tags["llm2clip.stage"] for r in runs) == sorted(expected)
    run_ids = {r.data.tags["llm2clip.pipeline_run_id"] for r in runs}
    assert len(run_ids) == 1
    (run_id,) = run_ids
    assert re.fullmatch(r"local-\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    (parent,) = client.search_runs(experiments, filter_string="tags.`llm2clip.stage` = 'pipeline'")
    assert parent.data.tags["llm2clip.pipeline_run_id"] == run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_artifacts_carry_metadata_and_evaluate_publishes_kfp_outputs(local_run):
    """Every output artifact gets its manifest's scalars as metadata (the KFP UI shows them);
    evaluate adds Metrics (compared across runs), HTML and Markdown (rendered in the UI)."""
    run_dir, _, _, _ = local_run
    executor = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    artifacts = {name: a["artifacts"][0] for name, a in executor["artifacts"].items()}
    report = artifacts["report"]["metadata"]
    assert report["stage"] == "evaluate" and report["primary_metric"] == "val.mean_R_at_1"
    assert isinstance(report["gate_passed"], bool) and 0.0 <= report["primary"] <= 1.0
    metrics = artifacts["metrics"]["metadata"]
    assert metrics["val.mean_R_at_1"] == report["primary"] and len(metrics) > 5
    html = (run_dir / "evaluate" / "report_html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64," in html
    assert "R@1" in (run_dir / "evaluate" / "report_markdown").read_text()
    data = json.loads((run_dir / "prepare-data-merge" / "executor_output.json").read_text())
    meta = data["artifacts"]["data"]["artifacts"][0]["metadata"]
    assert meta["stage"] == "prepare_data" and meta["counts.seen"] == 48
    register = json.loads((run_dir / "register" / "executor_output.json").read_text())
    reg_meta = register["artifacts"]["registration"]["artifacts"][0]["metadata"]
    assert any(str(v).startswith("models:/llm2clip-tiny") for v in reg_meta.values()), reg_meta


def test_the_eval_sets_run_in_the_parallel_for_and_evaluate_scores_each(local_run):
    """Each eval set of params.yaml (the demo's: long captions, German/French captions, an
    ImageNet-style folder) ran prepare_data + embed_captions as one ParallelFor iteration, and
    evaluate found every one among the collected outputs, by the name in its manifest."""
    run_dir, _, _, params = local_run
    names = list(yaml.safe_load(params.read_text())["eval_data"])
    report = run_dir / "evaluate" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    inputs = json.loads((report / "manifest.json").read_text())["eval_set_inputs"]
    found = set()
    for entry in inputs.values():  # each set's own prepare_data and embed_captions outputs
        data = json.loads((Path(entry["data"]) / "manifest.json").read_text())
        embeddings = json.loads((Path(entry["embeddings"]) / "manifest.json").read_text())
        assert data["eval_set"] == embeddings["eval_set"] and list(data["shards"]) == ["test"]
        found.add(data["eval_set"])
    assert found == set(names)
    assert metrics["long.images"] == metrics["crosslingual.images"] == 16 and metrics["shapes.images"] == 12
    assert "long.headline.mean_R_at_1" in metrics and "shapes.zeroshot_single.top1" in metrics
    groups = {c["group"] for c in json.loads((report / "paper_table.json").read_text())["columns"]}
    assert {"in-domain", "crosslingual"} <= groups


def test_both_data_stages_fanned_out_over_two_group_tasks(local_run):
    """Two group tasks per stage, each with its part; the merges' outputs are the stages' outputs
    (the next tasks read them) and the embeddings hold every shard of the data."""
    run_dir, _, _, _ = local_run
    for task in ("prepare-data-group", "embed-captions-group"):
        parts = sorted(json.loads(p.read_text())["part"] for p in run_dir.glob(f"for-loop-*/{task}/*/part.json"))
        assert parts == [0, 1], task
    data = json.loads((run_dir / "prepare-data-merge" / "data" / "manifest.json").read_text())
    embeddings = json.loads((run_dir / "embed-captions-merge" / "embeddings" / "manifest.json").read_text())
    assert sorted(s["image_shard"] for split in embeddings["sidecars"].values() for s in split) == sorted(
        s["name"] for split in data["shards"].values() for s in split)
