"""Tracking against a real ``mlflow server`` (sqlite backend) started by the test."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from llm2clip import tracking
from llm2clip.config import CommonConfig, PrepareDataConfig, config_hash
from llm2clip.io import StageError, atomic_write_json, dir_fingerprint
from llm2clip.tracking import resolve_tracking_uri


def _common(uri: str, **kw) -> CommonConfig:
    return CommonConfig(tracking_uri=uri, experiment=kw.pop("experiment", "t-tracking"), **kw)


def test_stage_run_logs_params_metrics_artifacts_and_lineage(mlflow_server, tmp_path):
    upstream = tmp_path / "data"
    atomic_write_json(upstream / "manifest.json", {"stage": "prepare_data", "shards": {"train": []}})
    report = tmp_path / "report.txt"
    report.write_text("hello")
    cfg, common = PrepareDataConfig(), _common(mlflow_server)

    with tracking.stage_run("caption_contrastive", cfg, common, inputs={"data": str(upstream)},
                            pipeline_run_id="kfp-123") as tracker:
        tracker.log_metrics({"cra_before": 0.25}, step=0)
        tracker.log_metrics({"cra_after": 0.75}, step=1)
        tracker.log_artifact(report, "reports")

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"cra_before": 0.25, "cra_after": 0.75}
    assert run.data.params["caption_contrastive.shard_size"] == str(cfg.shard_size)
    assert run.data.params["common.seed"] == "0"
    tags = run.data.tags
    assert tags["llm2clip.stage"] == "caption_contrastive"
    assert tags["llm2clip.config_hash"] == config_hash(common, cfg)
    assert tags["llm2clip.input.data.manifest_sha256"] == dir_fingerprint(upstream)
    assert tags["llm2clip.git_rev"] != ""
    assert [a.path for a in client.list_artifacts(tracker.run_id, "reports")] == ["reports/report.txt"]
    # the stage run hangs under one parent run per pipeline run
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags[tracking.PIPELINE_TAG] == "kfp-123"


def test_runs_of_one_pipeline_share_a_parent(mlflow_server):
    common = _common(mlflow_server, experiment="t-parent")
    ids = []
    for stage in ("prepare_data", "embed_captions"):
        with tracking.stage_run(stage, PrepareDataConfig(), common, pipeline_run_id="p-7") as t:
            ids.append(t.run_id)
    client = MlflowClient(mlflow_server)
    parents = {client.get_run(i).data.tags["mlflow.parentRunId"] for i in ids}
    assert len(parents) == 1


def test_a_failing_stage_marks_its_run_failed(mlflow_server):
    common = _common(mlflow_server, experiment="t-failed")
    with pytest.raises(StageError):
        with tracking.stage_run("prepare_data", PrepareDataConfig(), common) as tracker:
            raise StageError("bad input")
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FAILED"


def test_tracking_off_logs_nothing_and_needs_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = CommonConfig(tracking=False, tracking_uri="http://127.0.0.1:9")  # nothing listens there
    with tracking.stage_run("prepare_data", PrepareDataConfig(), common) as tracker:
        tracker.log_metrics({"x": 1.0})
        tracker.log_params({"a": 1})
        tracker.log_artifact(tmp_path)
    assert tracker.run_id is None and not tracker.enabled
    assert list(tmp_path.iterdir()) == []


def test_missing_input_manifest_is_a_clear_error(mlflow_server, tmp_path):
    with pytest.raises(StageError, match="manifest.json not found"):
        with tracking.stage_run("x", PrepareDataConfig(), _common(mlflow_server),
                                inputs={"data": str(tmp_path / "missing")}):
            pass


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(CommonConfig()) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(CommonConfig()) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri(CommonConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_flatten():
    assert tracking.flatten({"a": {"b": 1}, "c": [{"d": 2}], "e": []}) == {"a.b": 1, "c.0.d": 2, "e": []}
    assert json.dumps(tracking.flatten({"x": {}})) == '{"x": {}}'


def test_sqlite_store_keeps_artifacts_next_to_the_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / ".." )
    db_dir = tmp_path / "store"
    db_dir.mkdir()
    note = tmp_path / "note.txt"
    note.write_text("x")
    common = CommonConfig(tracking_uri=f"sqlite:///{db_dir / 'mlflow.db'}", experiment="t-sqlite")
    with tracking.stage_run("prepare_data", PrepareDataConfig(), common) as tracker:
        tracker.log_artifact(note)
    assert list((db_dir / "mlartifacts").rglob("note.txt"))


@pytest.mark.parametrize("marker", ["KFP_POD_NAME", "LLM2CLIP_ON_CLUSTER"])
def test_a_cluster_run_refuses_local_tracking_in_one_line(tmp_path, marker):
    """Inside a KFP task (the backend sets KFP_POD_NAME) or a TrainJob node, with no
    MLFLOW_TRACKING_URI, the first stage stops at once: no sqlite file, no output."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LLM2CLIP_ALLOW_LOCAL_TRACKING")}
    proc = subprocess.run(
        [sys.executable, "-m", "llm2clip", "prepare_data", "--set",
         "prepare_data.sources=[{kind: synthetic, count: 8}]", "--data", str(tmp_path / "data")],
        cwd=tmp_path, env={**env, marker: "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # a user's setup error, not a failed stage
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "Secret llm2clip-mlflow" in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "data" / "manifest.json").exists()


def test_cluster_tracking_rules(monkeypatch):
    from llm2clip.tracking import TrackingError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLM2CLIP_ALLOW_LOCAL_TRACKING", raising=False)
    monkeypatch.setenv("KFP_POD_NAME", "llm2clip-abc-system-container-impl-1")
    for local in ("", "sqlite:///tmp/x.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        with pytest.raises(TrackingError, match="dies with the pod"):
            resolve_tracking_uri(CommonConfig(tracking_uri=local))
    assert resolve_tracking_uri(CommonConfig(tracking_uri="http://mlflow:5000")) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    assert resolve_tracking_uri(CommonConfig()) == "https://mlflow.example"
    monkeypatch.setenv("LLM2CLIP_ALLOW_LOCAL_TRACKING", "1")  # the explicit opt-in
    assert resolve_tracking_uri(CommonConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"
    monkeypatch.delenv("KFP_POD_NAME")
    monkeypatch.delenv("LLM2CLIP_ALLOW_LOCAL_TRACKING")
    assert resolve_tracking_uri(CommonConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"  # off-cluster
