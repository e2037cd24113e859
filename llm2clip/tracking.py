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


PROBE_TIMEOUT_S = 5.0
"""How long :func:`check_server` waits for one answer of the tracking server."""
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's client retries a failed request 7 times with backoff 2 by default (~4 min before an
error); a stage sets these unless the environment does, so that an outage surfaces in seconds."""


def check_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast when an ``http(s)`` tracking server does not answer (``GET /health``, 2 tries).

    Any HTTP answer counts (an auth proxy's 401 too); other stores are not probed.

    Raises:
        TrackingError: one line naming the server, why, and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    start, reason = time.monotonic(), ""
    for attempt in range(2):
        try:  # the scheme is http(s): checked above
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):  # nosec B310
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            reason = f"{type(getattr(err, 'reason', err)).__name__}: {getattr(err, 'reason', err)}"
            if attempt == 0:
                time.sleep(1.0)
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({reason}; {time.monotonic() - start:.1f} s): start it or "
        "fix common.tracking_uri / $MLFLOW_TRACKING_URI, or run without tracking (--set common.tracking=false)")


def is_outage(err: BaseException) -> bool:
    """Whether an MLflow client error is the server being unreachable (not a bad request)."""
    from mlflow.exceptions import MlflowException

    text = str(err)
    return isinstance(err, OSError) or (isinstance(err, MlflowException) and any(
        marker in text for marker in ("Max retries exceeded", "Connection refused", "ConnectionError",
                                      "Read timed out", "RemoteDisconnected", "Connection aborted")))


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
    """What a stage logs through; a no-op when tracking is off (``run_id`` is then None).

    A tracking server that stops answering during a stage does not stop the stage: what could not
    be sent is kept (metrics with their step and time, params, tags, artifact paths), one warning
    says so, and each later call (and :meth:`flush`, at the end of the stage) sends it once the
    server answers again. What is still unsent at the end is named in a warning (:attr:`unsent`).
    Errors that are not an outage (a bad request) are raised as before.
    """

    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self._client = client
        self.run_id = run_id
        self._metrics: list[Any] = []  # unsent, in logging order
        self._params: list[Any] = []
        self._tags: list[Any] = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._down = False

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def unsent(self) -> dict[str, int]:
        """How many metric values, params, tags and artifacts are waiting for the server."""
        return {"metrics": len(self._metrics), "params": len(self._params), "tags": len(self._tags),
                "artifacts": len(self._artifacts)}

    def _send(self) -> bool:
        """Send everything waiting; False (kept, one warning per outage) while the server is down."""
        try:
            for start in range(0, max(len(self._params), 1), 100):  # MLflow's log_batch limit
                params = self._params[start : start + 100]
                if params:
                    self._client.log_batch(self.run_id, params=params)
            self._params = []
            if self._metrics or self._tags:
                self._client.log_batch(self.run_id, metrics=self._metrics, tags=self._tags, synchronous=True)
                self._metrics, self._tags = [], []
            while self._artifacts:
                path, artifact_path = self._artifacts[0]
                if Path(path).is_dir():
                    self._client.log_artifacts(self.run_id, path, artifact_path)
                else:
                    self._client.log_artifact(self.run_id, path, artifact_path)
                self._artifacts.pop(0)
        except Exception as err:
            if not is_outage(err):
                raise
            if not self._down:
                log.warning("MLflow tracking server unreachable (%s); the stage goes on and keeps what it logs "
                            "(%s) to send when the server answers again", str(err).splitlines()[0][:200],
                            ", ".join(f"{n} {k}" for k, n in self.unsent.items() if n) or "nothing yet")
            self._down = True
            return False
        if self._down:
            log.info("MLflow tracking server answers again: what was kept is logged")
            self._down = False
        return True

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._send()

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        self._params += [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._send()

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._tags += [RunTag(k, str(v)) for k, v in tags.items()]
        self._send()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file or a whole directory."""
        if not self.enabled:
            return
        self._artifacts.append((str(path), artifact_path))
        self._send()

    def flush(self) -> bool:
        """Send what is waiting; warn, naming it, when the server still does not answer."""
        if not self.enabled or self._send():
            return True
        names = sorted({m.key for m in self._metrics}) + [p for p, _ in self._artifacts]
        log.warning("MLflow run %s: NOT logged, the tracking server is down: %s (%s%s); the stage's outputs are "
                    "complete", self.run_id, ", ".join(f"{n} {k}" for k, n in self.unsent.items() if n),
                    ", ".join(names[:20]), ", ..." if len(names) > 20 else "")
        return False


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


def ensure_sqlite_store(uri: str) -> None:
    """Create a new server-less sqlite store whole, or not at all.

    MLflow builds a new sqlite store by running its ~60 schema migrations one after another; a
    process killed in between (found by the crash drill: a kill in the first seconds of the first
    stage) left a database every later start refused with a raw ``table ... already exists``. The
    store is built in a temp file beside it and linked into place in one step (if another process
    was first, its store is kept). A store left half-built by an older version is one clear line
    (:func:`stage_run`).
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.building"):  # a killed builder's
        with contextlib.suppress(ValueError, OSError):
            if not _alive(int(stale.name.rsplit(".", 2)[-2])):
                stale.unlink()
    building = path.with_name(f".{path.name}.{os.getpid()}.building")
    try:
        SqlAlchemyStore(f"sqlite:///{building}", _artifact_root(uri)).engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(building, path)
    finally:
        building.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_server(uri)
    ensure_sqlite_store(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(common.experiment)
    except Exception as err:
        if uri.startswith("sqlite:///") and "already exists" in str(err):
            raise TrackingError(f"the MLflow store {uri} was left half-built (a process was killed while MLflow "
                                "created it, before llm2clip built stores atomically): move it away and run again"
                                ) from err
        raise
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
        tracker.flush()
        _terminate(client, run.info.run_id, "FAILED")
        raise
    tracker.flush()
    _terminate(client, run.info.run_id, "FINISHED")


def _terminate(client: Any, run_id: str, status: str) -> None:
    """End the run; with the server down, say that it stays RUNNING there instead of failing the stage."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as err:
        if not is_outage(err):
            raise
        log.warning("MLflow run %s could not be marked %s (tracking server down); it shows as RUNNING there",
                    run_id, status)
