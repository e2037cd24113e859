"""A kfp.local run started from a DVC-versioned prepared dataset at a data revision: the pipeline
copies that prepare_data output instead of preparing again, every stage's MLflow run records the
revision, and so does the registered model version.

The test's git + DVC repository (tests/dvc_data_repo.py: tags v1 and v2, captions prefixed with
their tag) gets a third commit, ``prepared-v1``, that tracks (``dvc add``) the prepare_data output
of its ``data/photos`` read at v1 through a ``dvc`` source. The whole pipeline on the tiny profile
(tests/tiny_pipeline.py) with one evaluation set then runs with ``--data-revision prepared-v1
--prepared-repo <repo>``. Tracking goes to a real MLflow server (tests/conftest.py), read back
through MlflowClient. (The ``dvc`` source itself, at a revision, is tested in
tests/unit/data/test_dvc_source.py.)
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from dvc_data_repo import BIN, make_data_repo, sh
from kfp_helpers import REPO
from tiny_pipeline import tiny_params

from llm2clip.stages import STAGES

MODEL = "llm2clip-data-revision"
EXPERIMENT = "data-revision"


def version_prepared_data(repo, params: dict) -> str:
    """Prepare ``data/photos`` at v1 into ``data/prepared``, track it with DVC, commit and tag it
    ``prepared-v1``; returns the commit."""
    from llm2clip.config import load_sections
    from llm2clip.stages import prepare_data

    section = {**params["prepare_data"], "sources": [{
        "kind": "dvc", "name": "photos", "repo": str(repo), "path": "data/photos", "rev": "v1",
        "inner": {"kind": "manifest", "path": "manifest.csv", "caption_columns": {"short": "short", "dense": "dense"}},
    }]}
    cfg, common = load_sections("prepare_data", {**params["common"], "tracking": False}, section)
    prepare_data.run(cfg, common, data=str(repo / "data" / "prepared"))
    sh([str(BIN / "dvc"), "add", "-q", "data/prepared"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "prepared data of v1"], repo)
    sh(["git", "tag", "prepared-v1"], repo)
    return sh(["git", "rev-parse", "HEAD"], repo).strip()


@pytest.fixture(scope="module")
def revision_run(tmp_path_factory, mlflow_server):
    """One kfp.local run from the prepared data at ``prepared-v1``; yields (run dir, commits of the data repo)."""
    tmp = tmp_path_factory.mktemp("data_revision")
    commits = make_data_repo(tmp / "data-repo", count=48)
    params = tiny_params(tmp)
    params["common"].update(tracking=True, tracking_uri=mlflow_server, experiment=EXPERIMENT, registered_model=MODEL)
    commits["prepared-v1"] = version_prepared_data(tmp / "data-repo", params)
    # one small evaluation set (kfp.local cannot collect an empty ParallelFor)
    params["eval_data"] = {"scenes_long": params["eval_data"]["scenes_long"]}
    params["evaluate"]["eval_sets"] = [s for s in params["evaluate"]["eval_sets"] if s["name"] in ("val", "long")]
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # components/ and pipelines/ are not installed
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.local", "--params", str(tmp / "params.yaml"), "--data-revision",
         "prepared-v1", "--prepared-repo", str(tmp / "data-repo"), "--pipeline-root", str(tmp / "lo")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"pipelines.local failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    run_dir = tmp / "lo" / proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    return run_dir, commits


def test_the_run_started_from_the_versioned_prepared_data(revision_run):
    from llm2clip.data.shards import iter_samples

    run_dir, commits = revision_run
    assert not (run_dir / "prepare-data").exists()  # nothing was prepared again
    folder = run_dir / "prepare-data-import" / "data"
    data = str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    versioned = subprocess.run(["git", "show", "prepared-v1:data/prepared.dvc"], cwd=run_dir.parents[1] / "data-repo",
                               capture_output=True, text=True, check=True).stdout
    assert "md5:" in versioned and manifest["counts"]["seen"] == 48  # v2 has 47 scenes
    lineage = manifest["lineage"]["photos"]  # what prepared it: the dvc source at v1
    assert (lineage["rev"], lineage["commit"], lineage["path"]) == ("v1", commits["v1"], "data/photos")
    executor = json.loads((run_dir / "prepare-data-import" / "executor_output.json").read_text())
    meta = executor["artifacts"]["data"]["artifacts"][0]["metadata"]
    assert (meta["prepared.rev"], meta["prepared.commit"]) == ("prepared-v1", commits["prepared-v1"])
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
    assert {r.data.tags.get("llm2clip.data_revision") for r in runs} == {"prepared-v1"}
    _, commits = revision_run
    assert {r.data.tags.get("llm2clip.prepared_commit") for r in runs if r.data.tags.get("llm2clip.prepared_from")
            } == {commits["prepared-v1"]}  # the import's run
    registration = json.loads((run_dir / "register" / "registration" / "registration.json").read_text())
    version = client.get_model_version(MODEL, registration["version"])
    assert version.tags["data_revision"] == "prepared-v1"
    assert client.get_model_version_by_alias(MODEL, "champion").tags["data_revision"] == "prepared-v1"


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
