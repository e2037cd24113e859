"""MLflow tracking for every stage: params, metrics, artifacts and lineage tags.

Each stage run is one MLflow run named after the stage. Lineage tags say exactly what it was
made from: the git revision, the checksum of every input directory's manifest, the hash of the
stage config, the data revision (``common.data_revision``, when set), and the pipeline run it
belongs to (a KFP run id, or any id given with ``--pipeline-run-id``); runs of one pipeline run
are grouped under a parent run with that id.
With ``common.tracking: false`` the same calls do nothing, so stages never depend on a server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, config_hash, to_dict
from llm2clip.io import StageError, dir_fingerprint

log = logging.getLogger(__name__)

PIPELINE_TAG = "llm2clip.pipeline_run_id"
DATA_REVISION_TAG = "llm2clip.data_revision"
"""``common.data_revision``: the git/DVC revision of the data the run reads (set only when non-empty)."""


CLUSTER_RUN_ENV = ("KFP_POD_NAME", "LLM2CLIP_ON_CLUSTER")
"""Set inside a cluster run: KFP's backend sets ``KFP_POD_NAME`` on every task pod, the TrainJob
launcher sets ``LLM2CLIP_ON_CLUSTER=1`` on every node."""
ALLOW_LOCAL_ENV = "LLM2CLIP_ALLOW_LOCAL_TRACKING"
MLFLOW_SECRET = "llm2clip-mlflow"  # nosec B105  # the name of a Kubernetes Secret, not a secret


class TrackingError(StageError):
    """Tracking is configured so that runs would be lost; the message says what to set."""


def resolve_tracking_uri(common: CommonConfig) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Raises:
        TrackingError: Inside a KFP run or a TrainJob the URI is a local store (sqlite, file or a
            path) that dies with the pod; ``LLM2CLIP_ALLOW_LOCAL_TRACKING=1`` opts in.
    """
    uri = common.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    on_cluster = [name for name in CLUSTER_RUN_ENV if os.environ.get(name)]
    if on_cluster and not uri.startswith(("http://", "https://", "databricks")) \
            and os.environ.get(ALLOW_LOCAL_ENV) != "1":
        source = "common.tracking_uri" if common.tracking_uri else (
            "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default")
        raise TrackingError(
            f"MLflow tracking would be lost: inside a cluster run (${on_cluster[0]} is set) the tracking URI "
            f"from {source} is the local store {uri}, which dies with the pod. Create the Secret "
            f"{MLFLOW_SECRET} with key MLFLOW_TRACKING_URI=http://<mlflow server> (manifests/README.md), "
            f"or set common.tracking: false, or {ALLOW_LOCAL_ENV}=1 to keep a local store on purpose")
    return uri


def git_revision() -> str:
    """The commit the code runs from (``$LLM2CLIP_GIT_REV`` in images without .git)."""
    if rev := os.environ.get("LLM2CLIP_GIT_REV"):
        return rev
    try:
        out = subprocess.run(  # nosec B607  # git from PATH, fixed arguments, no shell
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=10, check=True,
        )
        dirty = subprocess.run(  # nosec B607  # git from PATH, fixed arguments, no shell
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}``."""
    out: dict[str, Any] = {}
    items = mapping.items() if isinstance(mapping, dict) else enumerate(mapping)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)) and value:
            out.update(flatten(value if isinstance(value, dict) else list(value), f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """What a stage logs through; a no-op when tracking is off (``run_id`` is then None)."""

    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self._client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's log_batch limit
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file or a whole directory."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)


def lineage_tags(
    stage: str, cfg: Any, common: CommonConfig, inputs: dict[str, str], pipeline_run_id: str
) -> dict[str, str]:
    """Tags that pin a run to its code, data and config."""
    tags = {
        "llm2clip.stage": stage,
        "llm2clip.git_rev": git_revision(),
        "llm2clip.config_hash": config_hash(common, cfg),
    }
    for name, path in inputs.items():
        tags[f"llm2clip.input.{name}.path"] = str(path)
        tags[f"llm2clip.input.{name}.manifest_sha256"] = dir_fingerprint(path, common.s3_endpoint_url)
    if revision := common.data_revision:
        tags[DATA_REVISION_TAG] = revision
    if pipeline_run_id:
        tags[PIPELINE_TAG] = pipeline_run_id
    return tags


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a server-less sqlite store go next to the db, not into ./mlruns of the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides


def _parent_run(client: Any, experiment_id: str, pipeline_run_id: str) -> str:
    """The run that groups one pipeline run's stages (created on first use)."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_run_id}' and tags.`llm2clip.stage` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{pipeline_run_id}",
        tags={PIPELINE_TAG: pipeline_run_id, "llm2clip.stage": "pipeline"},
    )
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: Any,
    common: CommonConfig,
    *,
    inputs: dict[str, str] | None = None,
    pipeline_run_id: str = "",
) -> Iterator[Tracker]:
    """Open the MLflow run of one stage; it ends FINISHED, or FAILED if the block raises."""
    if not common.tracking:
        yield Tracker()
        return
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(common)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(common.experiment)
    experiment_id = (
        experiment.experiment_id if experiment
        else client.create_experiment(common.experiment, artifact_location=_artifact_root(uri))
    )
    tags = lineage_tags(stage, cfg, common, inputs or {}, pipeline_run_id)
    if pipeline_run_id:
        tags["mlflow.parentRunId"] = _parent_run(client, experiment_id, pipeline_run_id)
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    tracker = Tracker(client, run.info.run_id)
    log.info("MLflow run %s (%s, experiment %s)", run.info.run_id, uri, common.experiment)
    tracker.log_params(flatten(to_dict(common), "common.") | flatten(to_dict(cfg), f"{stage}."))
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
