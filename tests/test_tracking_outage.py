"""Tracking-server outages, against a real ``mlflow server`` stopped and started again.

- down before a stage starts: one error line within seconds (a ``/health`` probe, MLflow's own
  client retries bounded), exit code 2, nothing written;
- down in the middle of a stage: the stage's work goes on; what it logs is kept and sent when the
  server answers again (the run ends FINISHED with every metric step and artifact), or, when the
  server is still down at the end, a warning names what was not logged.
"""

import logging
import time
from dataclasses import replace

from services import free_port, start_mlflow_server, stop

from llm2clip import tracking
from llm2clip.config import CommonConfig, PrepareDataConfig


def test_a_dead_server_stops_a_stage_in_one_line_before_it_writes(tmp_path, caplog):
    import json

    from llm2clip.cli import main
    from llm2clip.config import SyntheticSource, to_dict

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    common = to_dict(CommonConfig(tracking=True, tracking_uri=uri))
    cfg = to_dict(PrepareDataConfig(sources=(SyntheticSource(name="s", count=8, image_size=32),)))
    start = time.monotonic()
    code = main(["prepare_data", "--common-json", json.dumps(common), "--config-json", json.dumps(cfg),
                 "--data", str(tmp_path / "data")])
    print(f"dead tracking server: exit {code} after {time.monotonic() - start:.1f} s")  # docs/reliability.md
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert f"MLflow tracking server {uri} is not reachable" in errors[0].getMessage()
    assert "common.tracking=false" in errors[0].getMessage()
    assert not (tmp_path / "data").exists()


def common_for(uri: str) -> CommonConfig:
    return replace(CommonConfig(), tracking=True, tracking_uri=uri, experiment="outage")


def test_an_outage_mid_stage_is_ridden_out(tmp_path, caplog, monkeypatch):
    """One real server, stopped twice: once it comes back before the stage ends (everything
    logged, run FINISHED), once it does not (a warning names what was not logged)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what is tested is the keeping, not retries
    port = free_port()
    proc, uri = start_mlflow_server(tmp_path / "mlflow", port=port)
    report = tmp_path / "report.txt"
    report.write_text("made while the server was down")
    try:
        with caplog.at_level(logging.INFO, logger="llm2clip"):
            with tracking.stage_run("prepare_data", PrepareDataConfig(), common_for(uri)) as tracker:
                tracker.log_metrics({"loss": 1.0}, step=0)
                stop(proc)
                tracker.log_metrics({"loss": 0.5}, step=1)  # no exception: kept
                tracker.log_artifact(report)
                assert tracker.unsent == {"metrics": 1, "params": 0, "tags": 0, "artifacts": 1}
                proc, _ = start_mlflow_server(tmp_path / "mlflow", port=port)
                tracker.log_metrics({"loss": 0.25}, step=2)  # the server answers: what was kept goes out
                assert tracker.unsent == {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0}
        assert "MLflow tracking server unreachable" in caplog.text and "answers again" in caplog.text
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
            (0, 1.0), (1, 0.5), (2, 0.25)]
        assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.txt"]

        caplog.clear()
        with tracking.stage_run("prepare_data", PrepareDataConfig(), common_for(uri)) as tracker:
            stop(proc)
            tracker.log_metrics({"seen": 8, "kept": 8})  # the stage's work goes on
        assert "NOT logged, the tracking server is down: 2 metrics (kept, seen)" in caplog.text
        assert "shows as RUNNING there" in caplog.text
    finally:
        if proc.poll() is None:
            stop(proc)
