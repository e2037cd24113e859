"""The Kubernetes side of the TrainJob launcher: TrainJob calls, waiting, rank-0 logs, clear errors.

Everything here goes through the official ``kubernetes`` client (an ``ApiClient`` is injectable, so
tests point it at a loopback fake). API errors are turned into one-line :class:`TrainJobError`\\ s
that say what to do: a 403 names the verb and resource RBAC refused and the Role to apply, a 404 on
the TrainJob collection says that Kubeflow Trainer v2 is not installed.

- :class:`TrainJobApi`: create (``fieldValidation=Strict``), get, delete (foreground), rank-0 pods, logs.
- :func:`wait_for_trainjob`: poll ``status.conditions`` until ``Complete``/``Failed``; log each change
  of ``conditions``/``jobsStatus``; a lost node (a child job failed, then restarted) only logs.
- :class:`PodLogFollower`: stream the rank-0 pod's log in a thread; a new pod is followed again.
- :func:`cancel_on_sigterm`: turn KFP's SIGTERM into :class:`TrainJobCancelled` while waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from llm2clip.io import StageError

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RESOURCE = f"{PLURAL}.{GROUP}"
NODE = "node"
"""Replicated job *and* container name of the training nodes in the torch runtime (upstream and ours)."""

RBAC_HINT = ("apply manifests/base/rbac.yaml (Role llm2clip-trainjob-launcher bound to the service account "
             "llm2clip-pipeline, namespace llm2clip) and run the task as llm2clip-pipeline")

RANK0_POD_LABELS = {
    "jobset.sigs.k8s.io/jobset-name": "{name}",
    "jobset.sigs.k8s.io/replicatedjob-name": NODE,
    "batch.kubernetes.io/job-completion-index": "0",
}
"""Labels of the rank-0 node pod: JobSet names the JobSet after the TrainJob and labels its pods with
the JobSet and replicated-job names; the indexed Job labels each pod with its completion index, which
the Trainer's torch policy turns into ``PET_NODE_RANK`` (the same labels the Kubeflow SDK selects on)."""

_REQUEST_TIMEOUT_S = 30


class TrainJobError(StageError):
    """The TrainJob could not be created, watched or verified; the message says what to do."""

    status: int | None = None


class TrainJobNotFound(TrainJobError):
    """The named TrainJob does not exist (any more)."""


class TrainJobFailed(TrainJobError):
    """The TrainJob reached ``Failed``; ``reason`` and ``message`` are the job's own condition's."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"TrainJob {name} failed ({reason or 'no reason'}): {message or 'no message'}")
        self.name, self.reason, self.message = name, reason, message


class TrainJobTimeout(TrainJobError):
    """The launcher's deadline passed before the TrainJob finished (the job was deleted)."""


class TrainJobCancelled(TrainJobError):
    """The launcher got SIGTERM (KFP cancelled the task) while waiting; the TrainJob was deleted."""


def load_api_client() -> Any:
    """An ``ApiClient`` from the pod's service account, else from the kube config (``~/.kube/config``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _status_message(err: Any) -> tuple[str, dict]:
    """The ``message`` and ``details`` of the ``Status`` object in an ApiException's body."""
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else (err.body or "")
    try:
        status = json.loads(body)
    except ValueError:
        return body.strip() or str(err.reason), {}
    if not isinstance(status, dict):
        return body.strip(), {}
    return str(status.get("message") or err.reason), status.get("details") or {}


def api_error(err: Any, verb: str, resource: str, namespace: str) -> TrainJobError:
    """Turn a ``kubernetes`` ApiException of ``verb`` on ``resource`` into a one-line TrainJobError.

    The HTTP status is kept as the error's ``status`` attribute (5xx and 429 are worth a retry).
    """
    error = _api_error(err, verb, resource, namespace)
    error.status = err.status
    return error


def _api_error(err: Any, verb: str, resource: str, namespace: str) -> TrainJobError:
    message, details = _status_message(err)
    if err.status == 403:
        return TrainJobError(
            f"RBAC refused '{verb}' on {resource} in namespace {namespace}: {RBAC_HINT} ({message})")
    if err.status == 404 and resource == RESOURCE:
        if details.get("kind") == "namespaces":
            return TrainJobError(f"namespace {namespace} does not exist: apply manifests/base first ({message})")
        if details.get("name"):  # the collection exists, the named TrainJob does not
            return TrainJobNotFound(f"TrainJob {details['name']} not found in namespace {namespace} "
                                 f"(deleted by someone else?): {message}")
        return TrainJobError(
            f"Kubeflow Trainer v2 is not installed (no {RESOURCE} in the cluster): install Kubeflow "
            f"Trainer v2 and its JobSet dependency ({message})")
    if err.status == 422:
        return TrainJobError(f"the API server refused the TrainJob as invalid: {message}")
    return TrainJobError(f"'{verb}' on {resource} in namespace {namespace} failed: HTTP {err.status} {message}")


class TrainJobApi:
    """TrainJob and pod calls in one namespace, with errors made readable.

    Args:
        api_client: A ``kubernetes.client.ApiClient``.
        namespace: Namespace of the TrainJobs and their pods.
    """

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @contextlib.contextmanager
    def _calling(self, verb: str, resource: str = RESOURCE) -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException

        try:
            yield
        except ApiException as err:
            raise api_error(err, verb, resource, self.namespace) from err

    def create(self, job: dict) -> dict:
        """POST the TrainJob (``fieldValidation=Strict``: unknown fields are refused, not pruned)."""
        with self._calling("create"):
            return self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, job, field_validation="Strict",
                _request_timeout=_REQUEST_TIMEOUT_S)

    def get(self, name: str) -> dict:
        """GET one TrainJob."""
        with self._calling("get"):
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=_REQUEST_TIMEOUT_S)

    def delete(self, name: str) -> None:
        """DELETE one TrainJob with foreground propagation (its JobSet and pods go first)."""
        with self._calling("delete"):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground",
                body={"propagationPolicy": "Foreground"}, _request_timeout=_REQUEST_TIMEOUT_S)

    def rank0_pods(self, job_name: str) -> list[dict]:
        """The rank-0 node pods of a TrainJob (more than one after a restart), as plain dicts."""
        selector = ",".join(f"{k}={v.format(name=job_name)}" for k, v in RANK0_POD_LABELS.items())
        with self._calling("list", "pods"):
            resp = self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT_S)
        return json.loads(resp.data).get("items") or []

    def follow_log(self, pod: str) -> Any:
        """Open a ``follow=true`` log stream of the node container (an unread urllib3 response)."""
        with self._calling("get", "pods/log"):
            return self.core.read_namespaced_pod_log(
                pod, self.namespace, container=NODE, follow=True, _preload_content=False)


def _pod_key(pod: dict) -> str:
    """Identity of one run of a pod's container: uid plus restart count (a restart is followed again)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
    return f"{meta.get('uid') or meta.get('name')}/{restarts}"


def make_sink(log_sink: Any) -> Callable[[str], None]:
    """A ``str -> None`` from a logger-like object (``.info``) or a callable."""
    if hasattr(log_sink, "info"):
        return lambda line: log_sink.info("%s", line)
    if callable(log_sink):
        return log_sink
    raise TypeError(f"log_sink must be a logger or a callable, got {type(log_sink).__name__}")


class PodLogFollower:
    """Follow the rank-0 pod's log in a background thread; a new (restarted) pod is followed again.

    Lines go to ``emit`` as ``[<pod>] <line>``. :meth:`finish` lets the current stream end and picks
    up any pod not followed yet (the completed pod's logs stay readable); :meth:`stop` cuts it off.
    """

    def __init__(self, api: TrainJobApi, job_name: str, poll_s: float, emit: Callable[[str], None]) -> None:
        self.api, self.job_name, self.poll_s, self.emit = api, job_name, poll_s, emit
        self.followed: list[str] = []
        self.lines = 0
        self._seen: set[str] = set()
        self._final, self._stop = threading.Event(), threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{job_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout: float) -> None:
        """Let the streams end by themselves (the containers have exited), then stop."""
        self._final.set()
        if self._thread.ident is None:  # never started (creating the job failed)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("log stream of %s did not end within %.0f s; stopped", self.job_name, timeout)
            self.stop()

    def stop(self) -> None:
        """Stop following now (the job is being deleted)."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.close()
        if self._thread.ident is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            final = self._final.is_set()
            try:
                pod = self._next_pod()
            except TrainJobError as err:
                log.warning("not streaming the rank-0 logs of %s: %s", self.job_name, err)
                return
            except Exception as err:  # a transient API or network error: try again
                log.debug("listing pods of %s failed: %s", self.job_name, err)
                pod = None
            if pod is not None:
                self._follow(pod)
            elif final:
                return
            else:
                self._stop.wait(self.poll_s)

    def _next_pod(self) -> str | None:
        """The oldest rank-0 pod run whose logs are readable and were not followed yet."""
        pods = [p for p in self.api.rank0_pods(self.job_name)
                if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
                and _pod_key(p) not in self._seen]
        if not pods:
            return None
        pods.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        self._seen.add(_pod_key(pods[0]))
        return pods[0]["metadata"]["name"]

    def _follow(self, pod: str) -> None:
        log.info("streaming the logs of rank-0 pod %s", pod)
        self.followed.append(pod)
        try:
            self._resp = self.api.follow_log(pod)
            rest = b""
            for chunk in self._resp.stream(4096, decode_content=True):
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    self._emit(pod, line)
            if rest:
                self._emit(pod, rest)
        except Exception as err:  # a closed or broken stream ends this pod's log, not the job
            if not self._stop.is_set():
                log.debug("log stream of %s ended: %s", pod, err)
        finally:
            resp, self._resp = self._resp, None
            if resp is not None:
                with contextlib.suppress(Exception):
                    resp.release_conn()

    def _emit(self, pod: str, line: bytes) -> None:
        self.lines += 1
        self.emit(f"[{pod}] {line.decode('utf-8', 'replace').rstrip()}")


def condition(job: dict, kind: str) -> dict | None:
    """The condition ``kind`` (``Complete``, ``Failed``, ``Suspended``...) when its status is True."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def describe(job: dict) -> str:
    """One line of a TrainJob's state: true conditions, child jobs, progress."""
    status = job.get("status") or {}
    conds = [f"{c['type']}" + (f" ({c.get('reason')})" if c.get("reason") else "")
             for c in status.get("conditions") or [] if c.get("status") == "True"]
    jobs = [f"{j['name']}: active={j.get('active', 0)} ready={j.get('ready', 0)} "
            f"succeeded={j.get('succeeded', 0)} failed={j.get('failed', 0)}" for j in status.get("jobsStatus") or []]
    progress = (status.get("trainerStatus") or {}).get("progressPercentage")
    parts = [", ".join(conds) or "pending", *jobs] + ([f"progress {progress}%"] if progress is not None else [])
    return "; ".join(parts)


def _failed_jobs(job: dict) -> int:
    return sum(int(j.get("failed", 0)) for j in (job.get("status") or {}).get("jobsStatus") or [])


def _poll(api: TrainJobApi, name: str) -> dict | None:
    """GET the job; a transient error (5xx, 429, network) is logged and gives None."""
    import urllib3

    try:
        return api.get(name)
    except TrainJobError as err:
        if err.status is None or (err.status < 500 and err.status != 429):
            raise
        log.warning("polling TrainJob %s: %s (retrying)", name, err)
    except urllib3.exceptions.HTTPError as err:
        log.warning("polling TrainJob %s: %s (retrying)", name, err)
    return None


def wait_for_trainjob(api: TrainJobApi, name: str, poll_s: float, timeout_s: float | None) -> dict:
    """Poll until ``Complete`` (returned) or ``Failed`` (raised); log every change of state."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    last, failed = "", 0
    while True:
        job = _poll(api, name)
        if job is not None:
            state = describe(job)
            if state != last:
                log.info("TrainJob %s: %s", name, state)
                last = state
            if _failed_jobs(job) > failed:
                log.warning("TrainJob %s: a node job failed (node lost?); the Trainer/JobSet restarts the "
                            "nodes and the stage resumes from its last S3 checkpoint", name)
            failed = _failed_jobs(job)
            if condition(job, "Complete"):
                return job
            cond = condition(job, "Failed")
            if cond is not None:
                raise TrainJobFailed(name, cond.get("reason", ""), cond.get("message", ""))
        if deadline is not None and time.monotonic() > deadline:
            raise TrainJobTimeout(f"TrainJob {name} did not finish within {timeout_s:.0f} s (deleted); "
                                  f"last state: {last or 'unknown'}")
        time.sleep(poll_s)


@contextlib.contextmanager
def cancel_on_sigterm(what: str) -> Iterator[None]:
    """While inside, SIGTERM raises :class:`TrainJobCancelled` in the main thread; restored after.

    KFP cancels a task by deleting its pod, which sends SIGTERM; the caller deletes the TrainJob
    when it sees the exception. Outside the main thread signals cannot be handled: nothing is set.
    """
    if threading.current_thread() is not threading.main_thread():
        log.debug("not in the main thread: SIGTERM will not delete %s", what)
        yield
        return

    def _handler(signum: int, _frame: Any) -> None:
        raise TrainJobCancelled(f"cancelled by {signal.Signals(signum).name} while waiting for {what}")

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
