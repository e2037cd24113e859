"""A loopback Kubernetes API server for the TrainJob launcher: the calls it makes, nothing more.

:class:`FakeK8s` is a ``ThreadingHTTPServer`` on 127.0.0.1 that serves

- ``POST/GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]``,
- ``GET /api/v1/namespaces/{ns}/pods?labelSelector=k=v,...`` (equality selectors),
- ``GET /api/v1/namespaces/{ns}/pods/{pod}/log?follow=true`` (chunked, a line per chunk),

with the ``Status`` objects the real API server sends for 403/404/409/422. Every TrainJob it is
given or returns is checked with :func:`llm2clip.cluster.crds.validate`: an invalid POST body is
refused with 422 ``Invalid`` (as the API server would), an invalid object the scenario produced is a
500 and lands in :attr:`FakeK8s.errors` (a bug of the test, which the fixture reports).

A scenario is a list of :class:`Step`\\ s. After a TrainJob is created (or seeded), each GET of it
enters the next step (status, pods, an action such as writing the output manifest), unless the
current step waits for some pods' logs to be fully served: that makes "the launcher streamed pod A,
then pod B" deterministic without sleeping.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llm2clip.cluster import crds

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOBS = f"/apis/{GROUP}/{VERSION}/namespaces/"
_clock = itertools.count()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def jobs_status(active: int = 0, ready: int = 0, succeeded: int = 0, failed: int = 0) -> list[dict]:
    """``status.jobsStatus`` of the single ``node`` replicated job."""
    return [{"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]


def cond(kind: str, reason: str, message: str, status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": now()}


def running(nodes: int = 2, failed: int = 0) -> dict:
    return {"jobsStatus": jobs_status(active=1, ready=1 if nodes else 0, failed=failed)}


def complete() -> dict:
    return {"conditions": [cond("Complete", "JobSetCompleted", "jobset completed")],
            "jobsStatus": jobs_status(succeeded=1)}


def failed(reason: str, message: str) -> dict:
    return {"conditions": [cond("Failed", reason, message)], "jobsStatus": jobs_status(failed=1)}


@dataclass
class FakePod:
    """A node pod of the TrainJob; ``lines`` are its log."""

    name: str
    lines: list[str]
    phase: str = "Running"
    index: int = 0
    uid: str = field(default_factory=lambda: f"uid-{next(_clock)}")
    created: str = field(default_factory=lambda: f"2026-01-01T00:00:{next(_clock) % 60:02d}Z")


@dataclass
class Step:
    """One state of the TrainJob: entered on a GET once the previous step's ``wait_logs`` are served."""

    status: dict | None = None
    pods: list[FakePod] | None = None
    wait_logs: tuple[str, ...] = ()
    action: Callable[[], None] | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A ``v1 Status`` as the API server sends it with an error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


class FakeK8s:
    """The fake API server and its state.

    Args:
        scenario: The TrainJob's steps after creation.
        namespace: The only namespace that exists.
        forbid: ``{(verb, resource)}`` that RBAC refuses, e.g. ``("create", "trainjobs")``.
        crd_installed: False: every TrainJob path is 404 (Kubeflow Trainer not installed).
        line_delay: Seconds between two streamed log lines.
    """

    def __init__(self, scenario: list[Step], *, namespace: str = "llm2clip", forbid: tuple = (),
                 crd_installed: bool = True, line_delay: float = 0.005) -> None:
        self.scenario, self.namespace, self.forbid = scenario, namespace, set(forbid)
        self.crd_installed, self.line_delay = crd_installed, line_delay
        self.trainjobs: dict[str, dict] = {}
        self.pods: dict[str, FakePod] = {}
        self.served: set[str] = set()
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.step, self.active = -1, True
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeK8s:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> Any:
        """A ``kubernetes`` ApiClient that talks to this server."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def calls(self, method: str, suffix: str = "") -> list[Request]:
        """Recorded requests of ``method`` whose path ends with ``suffix``."""
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def seed(self, job: dict, status: dict | None = None, *, scenario_now: bool = True) -> None:
        """Store ``job`` as if an earlier attempt had created it.

        ``scenario_now``: its GETs walk the scenario; False: the scenario waits for the next create.
        """
        with self.lock:
            self.trainjobs[job["metadata"]["name"]] = self._stored(job, status)
            self.active = scenario_now

    # ---------------------------------------------------------------------------------- state

    def _stored(self, job: dict, status: dict | None = None) -> dict:
        """What the API server and the Trainer webhook make of a created job."""
        obj = copy.deepcopy(job)
        obj["metadata"].update({"uid": f"uid-{next(_clock)}", "resourceVersion": str(next(_clock)),
                                "generation": 1, "creationTimestamp": now()})
        for patch in obj["spec"].get("runtimePatches", []):
            patch["time"] = now()  # set by the Trainer admission webhook
        if status:
            obj["status"] = status
        return obj

    def _advance(self, name: str) -> None:
        """Enter the next step if the current one does not wait for unserved logs."""
        if not self.active or self.step >= 0 and not set(self.scenario[self.step].wait_logs) <= self.served:
            return
        if self.step + 1 >= len(self.scenario):
            return
        self.step += 1
        step = self.scenario[self.step]
        if step.status is not None:
            self.trainjobs[name]["status"] = copy.deepcopy(step.status)
        if step.pods is not None:
            self.pods = {p.name: p for p in step.pods}
        if step.action is not None:
            step.action()

    def _pod_object(self, job: str, pod: FakePod) -> dict:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": self.namespace, "uid": pod.uid,
                             "creationTimestamp": pod.created,
                             "labels": {"jobset.sigs.k8s.io/jobset-name": job,
                                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                        "batch.kubernetes.io/job-completion-index": str(pod.index)}},
                "spec": {"containers": [{"name": "node", "image": "img"}]},
                "status": {"phase": pod.phase}}


def _handler(fake: FakeK8s) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.fake = fake
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeK8s

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _job(self, code: int, obj: dict) -> None:
        """Send a TrainJob, checking it against the CRD schema first."""
        try:
            crds.validate(obj)
        except crds.CRDValidationError as err:
            self.fake.errors.append(f"fake returned an invalid TrainJob: {err}")
            return self._send(500, status_object(500, "InternalError", str(err)))
        self._send(code, obj)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        fake = self.fake
        with fake.lock:
            fake.requests.append(Request(method, url.path, query, body))
        parts = url.path.strip("/").split("/")
        if url.path.startswith(TRAINJOBS):
            return self._trainjobs(method, parts[5:], query, body)
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
            return self._pods(parts[3], parts[5:], query)
        self._send(404, status_object(404, "NotFound", "the server could not find the requested resource"))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _forbidden(self, verb: str, resource: str, group: str = "") -> bool:
        if (verb, resource) not in self.fake.forbid:
            return False
        in_group = f' in API group "{group}"' if group else ""
        name = f"{resource}.{group}" if group else resource
        self._send(403, status_object(
            403, "Forbidden",
            f'{name} is forbidden: User "system:serviceaccount:{self.fake.namespace}:default" cannot {verb} '
            f'resource "{resource}"{in_group} in the namespace "{self.fake.namespace}"',
            {"group": group, "kind": resource}))
        return True

    def _trainjobs(self, method: str, rest: list[str], query: dict, body: Any) -> None:
        fake, ns = self.fake, self.path.split("/")[5]
        if not fake.crd_installed:
            return self._send(404, status_object(404, "NotFound", "the server could not find the requested resource"))
        if ns != fake.namespace:
            return self._send(404, status_object(404, "NotFound", f'namespaces "{ns}" not found',
                                                 {"name": ns, "kind": "namespaces"}))
        name = rest[1] if len(rest) > 1 else ""
        verb = "create" if method == "POST" else {"GET": "get", "DELETE": "delete"}[method] if name else "list"
        if self._forbidden(verb, PLURAL, GROUP):
            return None
        if method == "POST":
            return self._create(body)
        if not name:
            return self._send(405, status_object(405, "MethodNotAllowed", f"{verb} is not faked"))
        details = {"name": name, "group": GROUP, "kind": PLURAL}
        with fake.lock:
            if name not in fake.trainjobs:
                return self._send(404, status_object(404, "NotFound", f'{PLURAL}.{GROUP} "{name}" not found', details))
            if method == "DELETE":
                obj = fake.trainjobs.pop(name)
                fake.pods = {}
                obj["metadata"]["deletionTimestamp"] = now()
                return self._job(200, obj)
            fake._advance(name)
            obj = copy.deepcopy(fake.trainjobs[name])
        self._job(200, obj)

    def _create(self, body: dict) -> None:
        fake = self.fake
        try:
            crds.validate(body)
        except crds.CRDValidationError as err:
            name = (body.get("metadata") or {}).get("name", "")
            causes = [{"reason": "FieldValueInvalid", "message": p} for p in err.problems]
            return self._send(422, status_object(
                422, "Invalid", f'TrainJob.{GROUP} "{name}" is invalid: {"; ".join(err.problems)}',
                {"name": name, "group": GROUP, "kind": "TrainJob", "causes": causes}))
        name = body["metadata"]["name"]
        with fake.lock:
            if name in fake.trainjobs:
                return self._send(409, status_object(409, "AlreadyExists", f'{PLURAL}.{GROUP} "{name}" already exists',
                                                     {"name": name, "group": GROUP, "kind": PLURAL}))
            fake.trainjobs[name] = fake._stored(body)
            fake.step, fake.active = -1, True
            obj = copy.deepcopy(fake.trainjobs[name])
        self._job(201, obj)

    def _pods(self, ns: str, rest: list[str], query: dict) -> None:
        fake = self.fake
        if not rest:
            if self._forbidden("list", "pods"):
                return None
            wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
            with fake.lock:
                jobs = list(fake.trainjobs)
                items = [fake._pod_object(job, pod) for job in jobs for pod in fake.pods.values()]
            items = [p for p in items if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        if rest[1:] != ["log"]:
            return self._send(405, status_object(405, "MethodNotAllowed", "only pods/{name}/log is faked"))
        if self._forbidden("get", "pods/log"):
            return None
        with fake.lock:
            pod = fake.pods.get(rest[0])
        if pod is None:
            return self._send(404, status_object(404, "NotFound", f'pods "{rest[0]}" not found',
                                                 {"name": rest[0], "kind": "pods"}))
        self._stream(pod)

    def _stream(self, pod: FakePod) -> None:
        """The pod's log as chunked text/plain, one line per chunk (what ``follow=true`` looks like)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in pod.lines:
            data = (line + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            time.sleep(self.fake.line_delay)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        with self.fake.lock:
            self.fake.served.add(pod.name)
