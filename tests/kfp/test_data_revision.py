"""A kfp.local run started from a data revision: the pipeline reads a DVC-tracked source at that
revision, every stage's MLflow run records it, and so does the registered model version.

The whole pipeline on the tiny profile (tests/tiny_pipeline.py) with one evaluation set, its one
training source a ``dvc`` source without a ``rev`` on the test's git + DVC repository (tests/dvc_data_repo.py:
tags v1 and v2, captions prefixed with their tag), started with ``--data-revision v1``. Tracking
goes to a real MLflow server (tests/conftest.py), read back through MlflowClient.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from dvc_data_repo import make_data_repo
from kfp_helpers import REPO
from tiny_pipeline import tiny_params

from llm2clip.stages import STAGES

MODEL = "llm2clip-data-revision"
EXPERIMENT = "data-revision"


@pytest.fixture(scope="module")
def revision_run(tmp_path_factory, mlflow_server):
    """One kfp.local run with ``--data-revision v1``; yields (run dir, commits of the data repo)."""
    tmp = tmp_path_factory.mktemp("data_revision")
    commits = make_data_repo(tmp / "data-repo", count=48)
    params = tiny_params(tmp)
    params["common"].update(tracking=True, tracking_uri=mlflow_server, experiment=EXPERIMENT, registered_model=MODEL)
    params["prepare_data"]["sources"] = [{
        "kind": "dvc", "name": "photos", "repo": str(tmp / "data-repo"), "path": "data/photos",
        "inner": {"kind": "manifest", "path": "manifest.csv", "caption_columns": {"short": "short", "dense": "dense"}},
    }]
    # one small evaluation set (kfp.local cannot collect an empty ParallelFor)
    params["eval_data"] = {"scenes_long": params["eval_data"]["scenes_long"]}
    params["evaluate"]["eval_sets"] = [s for s in params["evaluate"]["eval_sets"] if s["name"] in ("val", "long")]
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # components/ and pipelines/ are not installed
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.local", "--params", str(tmp / "params.yaml"), "--data-revision", "v1",
         "--pipeline-root", str(tmp / "lo")], cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"pipelines.local failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    run_dir = tmp / "lo" / proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    return run_dir, commits


def test_prepare_data_read_the_dvc_source_at_the_data_revision(revision_run):
    from llm2clip.data.shards import iter_samples

    run_dir, _ = revision_run
    data = str(run_dir / "prepare-data" / "data")
    manifest = json.loads((run_dir / "prepare-data" / "data" / "manifest.json").read_text())
    assert manifest["counts"]["seen"] == 48  # v2 has 47 scenes
    _, commits = revision_run
    lineage = manifest["lineage"]["photos"]  # what the dvc source read: the commit v1 named at run time
    assert (lineage["rev"], lineage["commit"], lineage["path"]) == ("v1", commits["v1"], "data/photos")
    samples = [s for split in ("train", "val") for s in iter_samples(data, split, decode=False)]
    assert len(samples) == manifest["counts"]["train"] + manifest["counts"]["val"] > 0
    prefixes = {caption.split(" ", 1)[0] for s in samples for captions in s.captions.values() for caption in captions}
    assert prefixes == {"v1"}


def test_every_stage_run_and_the_registered_version_record_the_data_revision(revision_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir, _ = revision_run
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`llm2clip.stage` != 'pipeline'")
    assert {r.data.tags["llm2clip.stage"] for r in runs} == set(STAGES)  # the eval set's tasks too
    assert {r.data.tags.get("llm2clip.data_revision") for r in runs} == {"v1"}
    registration = json.loads((run_dir / "register" / "registration" / "registration.json").read_text())
    version = client.get_model_version(MODEL, registration["version"])
    assert version.tags["data_revision"] == "v1"
    assert client.get_model_version_by_alias(MODEL, "champion").tags["data_revision"] == "v1"


def test_the_flag_sets_common_data_revision_as_a_string_for_every_task(tmp_path, caplog):
    """``--data-revision 0123456`` stays a string (a --set value is YAML); every task's ``common``
    carries it, the eval sets' too; a name that is no commit sha gets the caching warning."""
    from llm2clip.config import load_params
    from pipelines import submit
    from pipelines.llm2clip_pipeline import data_revision_override, pipeline_arguments

    params = load_params(REPO / "params.yaml", data_revision_override("0123456"))
    assert params.common.data_revision == "0123456"
    arguments = pipeline_arguments(params)
    assert arguments["common"]["data_revision"] == "0123456"
    assert {item["common"]["data_revision"] for item in arguments["eval_data"]} == {"0123456"}
    assert data_revision_override("") == data_revision_override(None) == []

    args = submit.build_parser().parse_args(["--params", str(REPO / "params.yaml"), "--data-revision", "main"])
    with caplog.at_level("WARNING", logger="pipelines.submit"):
        plan = submit.prepare(args, tmp_path)
    assert plan.arguments["common"]["data_revision"] == "main"
    assert "--data-revision main is not a full commit sha" in caplog.text
