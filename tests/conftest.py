"""Shared fixtures: real servers on 127.0.0.1 (moto S3, MLflow), tiny configs, offline env."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from services import start_mlflow_server, stop, wait_http  # noqa: F401 (re-exported for older tests)

from llm2clip.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# No hub, no telemetry, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto server) on 127.0.0.1; yields its endpoint URL.

    Sets dummy AWS credentials in the environment for the session (never real ones).
    """
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_http(f"{endpoint}/moto-api/", 30, proc)
        yield endpoint
    finally:
        stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``(endpoint_url, bucket_name)``."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking + registry server with a sqlite backend; yields its URI."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        stop(proc)


@pytest.fixture()
def sqlite_tracking(tmp_path):
    """A server-less MLflow tracking URI in a temp dir (fast; for stage tests)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None or (BIN / cmd).exists()


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """A clean clone of the repo after `dvc repro` of the tiny profile (tests/test_dvc.py), shared by
    every module that needs one (the repro is the slow part); tests copy it before changing it.

    The repro is the crash drill's bounded run (tests/kill_drill.py): SIGKILLed once at a seeded
    random point inside each long pipeline stage, started again after each kill. Its report is
    ``kill-report.json`` beside the clone; the DVC tests check that it ends as a clean repro does.
    """
    from kill_drill import PIPELINE_STAGES, repro_with_kills
    from test_dvc import clean_clone

    clone = clean_clone(tmp_path_factory.mktemp("dvc") / "repo")
    with open(clone.parent / "repro.log", "w") as log:
        report = repro_with_kills(clone, kills=len(PIPELINE_STAGES), seed=0, stages=PIPELINE_STAGES, log=log)
    (clone.parent / "kill-report.json").write_text(json.dumps(report.to_dict()))
    return clone
