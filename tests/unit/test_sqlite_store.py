"""A process killed while MLflow builds a new sqlite store must not leave a store nobody can open.

Found by the crash drill (tests/kill_drill.py): a kill in the first seconds of the first stage of
`make run` / `dvc repro` (the default tracking store is ``sqlite:///mlflow.db``) caught MLflow
between two schema migrations, and every later stage died with a raw ``table scheduler_leases
already exists``. Here the kill is exact: the building process SIGKILLs itself right after a
chosen ``CREATE TABLE`` (a SQLAlchemy event hook), inside MLflow's real migrations.
"""

import json
import logging
import signal
import subprocess
import sys

import pytest

from llm2clip import tracking
from llm2clip.config import CommonConfig, PrepareDataConfig

BUILD = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

uri, table, how = sys.argv[1:4]

@event.listens_for(Engine, "after_cursor_execute")
def die(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE " + table.upper()):
        os.kill(os.getpid(), signal.SIGKILL)

if how == "llm2clip":
    from llm2clip.tracking import ensure_sqlite_store
    ensure_sqlite_store(uri)
else:  # what every stage did before: MLflow builds the store in place on first use
    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=uri).search_experiments()
"""
# An early table, and the one the drill's kill left half-made (a late migration's).
KILL_AT = ["experiments", "scheduler_leases"]


def build_and_die(uri: str, table: str, how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", BUILD, uri, table, how], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at CREATE TABLE {table}: {proc.stderr[-2000:]}"


def common(uri: str) -> CommonConfig:
    return CommonConfig(tracking=True, tracking_uri=uri, experiment="kill")


@pytest.mark.parametrize("table", KILL_AT)
def test_a_kill_while_the_store_is_built_leaves_no_store_and_the_next_start_builds_it(tmp_path, table):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    build_and_die(uri, table, "llm2clip")
    assert not (tmp_path / "mlflow.db").exists()  # not there at all, rather than half-built
    with tracking.stage_run("prepare_data", PrepareDataConfig(), common(uri)) as tracker:
        tracker.log_metrics({"kept": 1.0})
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"kept": 1.0}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".building")] == []  # the next start's own


def test_a_store_mlflow_left_half_built_is_one_clear_line(tmp_path, caplog):
    """Without the atomic build (MLflow alone), the same kill leaves the store the drill saw; a
    stage then stops with one line that says what to do, not a traceback."""
    from llm2clip.cli import main
    from llm2clip.config import SyntheticSource, to_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    build_and_die(uri, "scheduler_leases", "mlflow")
    assert (tmp_path / "mlflow.db").exists()
    cfg = to_dict(PrepareDataConfig(sources=(SyntheticSource(name="s", count=8, image_size=32),)))
    code = main(["prepare_data", "--common-json", json.dumps(to_dict(common(uri))), "--config-json",
                 json.dumps(cfg), "--data", str(tmp_path / "data")])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "was left half-built" in errors[0].getMessage() and "move it away" in errors[0].getMessage()
    assert not (tmp_path / "data").exists()
