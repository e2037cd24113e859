"""Real servers on 127.0.0.1 for tests: start, wait for, stop (MLflow here; moto in conftest).

A module with its own name: ``from conftest import ...`` gets whichever conftest.py pytest
imported last (tests/kfp has one too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llm2clip.train.distributed import free_port

BIN = Path(sys.executable).parent
__all__ = ["free_port", "start_mlflow_server", "stop", "wait_http"]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_mlflow_server(workdir: Path, extra_env: dict | None = None, artifacts: str | None = None,
                        port: int | None = None, backend: str | None = None):
    """Start ``mlflow server`` (sqlite backend in ``workdir``, or ``backend``) on ``port`` (default:
    a free one); returns ``(proc, uri)``. Started again on the same folder and port, it is the same
    server."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "a")
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend or f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", artifacts or str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(extra_env or {})})
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", 120, proc)
    return proc, uri
