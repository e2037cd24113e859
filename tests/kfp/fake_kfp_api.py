"""A Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for tests that drive the real ``kfp.Client``.

It serves the calls ``pipelines.submit`` makes (healthz, pipelines list/upload, versions
list/upload, experiments list/create, runs create/get, recurring runs create), also under the
Kubernetes API server's service proxy path, keeps what was
created in memory and records every request. Schema check, both ways: request bodies (and the
``filter`` query) must use only fields of the ``kfp_server_api`` model they are sent as, with
allowed enum values; every response is checked the same way and then deserialized by
``kfp_server_api``'s own ``ApiClient`` before it is sent. Violations answer 400 (request) or are
kept in ``schema_errors`` (response), which tests assert empty.

    with FakeKfpApi(token="s3cret", run_states=["RUNNING", "SUCCEEDED"]) as api:
        ... kfp.Client(host=api.url, existing_token="s3cret") ...
        api.requests   # [Request(method, path, query, json, headers, files)]
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kfp_server_api
import yaml
from kfp_server_api import models

API = "/apis/v2beta1"
UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT = 16, 7, 5, 6, 3
"""google.rpc.Code values the KFP API server puts in its error bodies."""


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]  # names lower-cased
    files: dict[str, bytes] = field(default_factory=dict)
    proxy_namespace: str | None = None
    """Set when the request came through the Kubernetes API server's service proxy path
    (``/api/v1/namespaces/<ns>/services/ml-pipeline:http/proxy/``), as ``kfp.Client`` sends
    it without a host: the namespace in that path."""


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --------------------------------------------------------------------------------------------
# schema check against the kfp_server_api models


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def schema_errors(data: Any, type_name: str, where: str = "$", proto_json: bool = False) -> list[str]:
    """Differences between ``data`` and the ``kfp_server_api`` type ``type_name`` (e.g.
    ``"V2beta1Run"``, ``"list[V2beta1Pipeline]"``): unknown fields, wrong JSON types, enum values
    not allowed. ``proto_json``: also accept what protobuf's JSON parser does (lowerCamelCase
    field names, enum numbers, int64 as a number), as the server does for request bodies and
    the ``filter`` query; responses are checked without it."""
    if data is None:
        return []
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{where}: expected a list, got {type(data).__name__}"]
        return [e for i, v in enumerate(data) for e in schema_errors(v, m.group(1), f"{where}[{i}]", proto_json)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(data, dict):
            return [f"{where}: expected an object, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in schema_errors(v, m.group(1), f"{where}.{k}", proto_json)]
    simple = {"str": (str,), "bool": (bool,), "float": (int, float), "object": (object,)}
    if proto_json and type_name == "str" and isinstance(data, int) and not isinstance(data, bool):
        return []  # an int64 field (the API declares those as strings) given as a JSON number
    if type_name in simple:
        ok = isinstance(data, simple[type_name]) and not (type_name == "float" and isinstance(data, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {type(data).__name__}"]
    if type_name == "int":  # int64 travels as a string in proto JSON
        ok = (isinstance(data, int) and not isinstance(data, bool)) or (isinstance(data, str) and data.isdigit())
        return [] if ok else [f"{where}: expected int, got {data!r}"]
    if type_name == "datetime":
        try:
            datetime.fromisoformat(str(data).replace("Z", "+00:00"))
        except ValueError:
            return [f"{where}: not an RFC 3339 time: {data!r}"]
        return []
    klass = getattr(models, type_name)
    if not klass.openapi_types:  # an enum
        allowed = klass.allowable_values
        if proto_json and isinstance(data, int) and 0 <= data < len(allowed):
            return []
        return [] if data in allowed else [f"{where}: {data!r} is not one of {allowed}"]
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} object, got {type(data).__name__}"]
    by_key = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    if proto_json:
        by_key |= {_camel(json_key): attr for json_key, attr in list(by_key.items())}
    errors = []
    for key, value in data.items():
        if key not in by_key:
            errors.append(f"{where}.{key}: no such field in {type_name}")
        else:
            errors += schema_errors(value, klass.openapi_types[by_key[key]], f"{where}.{key}", proto_json)
    return errors


def canonical(data: Any, type_name: str) -> Any:
    """``data`` (which passed ``schema_errors(..., proto_json=True)``) as the server writes it:
    the API's field names, enum names, int64 as strings."""
    if data is None:
        return None
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return [canonical(v, m.group(1)) for v in data]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {k: canonical(v, m.group(1)) for k, v in data.items()}
    if type_name == "str" and isinstance(data, int):
        return str(data)
    if not hasattr(models, type_name):
        return data
    klass = getattr(models, type_name)
    if not klass.openapi_types:
        return klass.allowable_values[data] if isinstance(data, int) else data
    by_key = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    by_key |= {_camel(json_key): attr for json_key, attr in list(by_key.items())}
    return {klass.attribute_map[by_key[k]]: canonical(v, klass.openapi_types[by_key[k]]) for k, v in data.items()}


def deserialize(data: Any, type_name: str) -> Any:
    """``data`` read back by kfp_server_api exactly as the client reads a response body."""

    class _Response:
        def __init__(self, body: str) -> None:
            self.data = body

    return kfp_server_api.ApiClient().deserialize(_Response(json.dumps(data)), type_name)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_struct(text: str) -> dict[str, Any]:
    """What the API returns as a version's ``pipeline_spec``: the IR, with its platform spec
    beside it when the YAML has one."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    return docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}


# --------------------------------------------------------------------------------------------
# the server


class FakeKfpApi:
    """The KFP API server; use as a context manager (``url`` is ``http://127.0.0.1:<port>``).

    Args:
        token: Bearer token every request must carry (None: no auth). A wrong or missing one
            answers 401 (``UNAUTHENTICATED``).
        forbid: Answer every request 403 (``PERMISSION_DENIED``), as an RBAC denial does.
        run_states: The states successive ``GET runs/<id>`` report; the last one stays.
        run_error: Error message a run reports when in state FAILED.
        multi_user: What healthz says.
        login_page: Act as an auth proxy in front of the API (Kubeflow's oauth2-proxy / Dex)
            for requests without a token: 302 to a login page that answers 200 with HTML.
        on_request: Called with each recorded request once its answer is ready.
    """

    def __init__(self, token: str | None = None, forbid: bool = False, run_states: list[str] | None = None,
                 run_error: str = "task train_vision failed: exit code 1", multi_user: bool = True,
                 login_page: bool = False, on_request: Callable[[Request], None] | None = None) -> None:
        self.token, self.forbid, self.multi_user, self.on_request = token, forbid, multi_user, on_request
        self.login_page = login_page
        self.run_states = list(run_states or ["PENDING"])
        self.run_error = run_error
        self.requests: list[Request] = []
        self.schema_errors: list[str] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> FakeKfpApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api._handle(self)

            def do_POST(self) -> None:
                api._handle(self)

            def do_DELETE(self) -> None:
                api._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def calls(self, method: str, path: str) -> list[Request]:
        """Recorded requests of one method to one path (a regex, without the /apis/v2beta1 prefix)."""
        return [r for r in self.requests if r.method == method and re.fullmatch(API + path, r.path)]

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        path, proxy_namespace = url.path, None
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/services/ml-pipeline:http/proxy/*(/apis/.*)", path):
            proxy_namespace, path = m.groups()
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        content_type = handler.headers.get("Content-Type", "")
        body, files = None, {}
        if content_type.startswith("multipart/form-data"):
            message = BytesParser(policy=policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
            for part in message.iter_parts():
                files[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
        elif raw:
            body = json.loads(raw)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        request = Request(handler.command, path, query, body, headers, files, proxy_namespace)
        with self._lock:
            self.requests.append(request)
            if self.login_page and "authorization" not in headers:
                self._login(handler, request)
                return
            try:
                self._authorise(request)
                status, type_name, payload = self._route(request)
            except ApiError as err:
                status, type_name = err.status, "GoogleRpcStatus"
                payload = {"code": err.code, "message": err.message, "details": []}
            if status < 400:
                problems = schema_errors(payload, type_name)
                try:
                    deserialize(payload, type_name)
                except Exception as err:  # noqa: BLE001 - any failure to read it back is a schema error
                    problems.append(f"kfp_server_api cannot read it back: {err!r}")
                self.schema_errors += [f"{request.method} {request.path} -> {type_name}: {p}" for p in problems]
            if self.on_request:
                self.on_request(request)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _login(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        if request.path == "/dex/auth":
            data, status = b"<html><body>Log in to Kubeflow</body></html>", 200
        else:
            data, status = b"", 302
        handler.send_response(status)
        if status == 302:
            handler.send_header("Location", "/dex/auth")
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _authorise(self, request: Request) -> None:
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, UNAUTHENTICATED, "Request header error: there is no user identity header.")
        if self.forbid:
            raise ApiError(403, PERMISSION_DENIED, "Failed to authorize with API: PermissionDenied")

    def _checked(self, data: Any, type_name: str, where: str) -> Any:
        """A request body or query object as the server's protobuf JSON parser reads it, in the
        canonical form the server answers with (snake_case names, int64 as strings)."""
        problems = schema_errors(data, type_name, where, proto_json=True)
        if problems:
            self.schema_errors += problems
            raise ApiError(400, INVALID_ARGUMENT, "; ".join(problems))
        data = canonical(data, type_name)
        return kfp_server_api.ApiClient().sanitize_for_serialization(deserialize(data, type_name))

    def _filter_name(self, request: Request) -> str | None:
        """The display name an EQUALS filter asks for (the only filter submit sends)."""
        if "filter" not in request.query:
            return None
        spec = self._checked(json.loads(request.query["filter"]), "V2beta1Filter", "filter")
        for predicate in spec.get("predicates", []):
            if predicate.get("key") == "display_name" and predicate.get("operation") == "EQUALS":
                return predicate.get("string_value")
        raise ApiError(400, INVALID_ARGUMENT, f"unsupported filter {spec}")

    def _route(self, r: Request) -> tuple[int, str, Any]:
        m = re.fullmatch(API + r"(/.*)", r.path)
        path = m.group(1) if m else ""
        routes: list[tuple[str, str, Callable[..., tuple[int, str, Any]]]] = [
            ("GET", r"/healthz", self._healthz),
            ("GET", r"/pipelines", self._list_pipelines),
            ("POST", r"/pipelines/upload", self._upload_pipeline),
            ("POST", r"/pipelines/upload_version", self._upload_version),
            ("GET", r"/pipelines/([^/]+)/versions", self._list_versions),
            ("GET", r"/experiments", self._list_experiments),
            ("POST", r"/experiments", self._create_experiment),
            ("POST", r"/runs", self._create_run),
            ("GET", r"/runs/([^/:]+)", self._get_run),
            ("POST", r"/recurringruns", self._create_recurring_run),
        ]
        for method, pattern, action in routes:
            if r.method == method and (match := re.fullmatch(pattern, path)):
                return action(r, *match.groups())
        self.schema_errors.append(f"unexpected call {r.method} {r.path}")
        raise ApiError(404, NOT_FOUND, f"no route {r.method} {r.path}")

    # -- endpoints --------------------------------------------------------------------------

    def _healthz(self, r: Request) -> tuple[int, str, Any]:
        return 200, "V2beta1GetHealthzResponse", {"multi_user": self.multi_user, "pipeline_store": "database"}

    def _list_pipelines(self, r: Request) -> tuple[int, str, Any]:
        name, namespace = self._filter_name(r), r.query.get("namespace", "")
        found = [p for p in self.pipelines.values()
                 if p.get("namespace", "") == namespace and name in (None, p["display_name"])]
        return 200, "V2beta1ListPipelinesResponse", {"pipelines": found, "total_size": len(found)} if found else {}

    def _new_version(self, pipeline_id: str, name: str, description: str, text: str) -> dict[str, Any]:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                   "name": name, "description": description, "created_at": _now(),
                   "pipeline_spec": _spec_struct(text)}
        self.versions.setdefault(pipeline_id, []).append(version)
        return version

    def _uploaded(self, r: Request) -> str:
        if set(r.files) != {"uploadfile"}:
            raise ApiError(400, INVALID_ARGUMENT, f"expected one multipart file 'uploadfile', got {sorted(r.files)}")
        return r.files["uploadfile"].decode()

    def _upload_pipeline(self, r: Request) -> tuple[int, str, Any]:
        text, name = self._uploaded(r), r.query.get("display_name") or r.query.get("name", "")
        namespace = r.query.get("namespace", "")
        if any(p["display_name"] == name and p.get("namespace", "") == namespace for p in self.pipelines.values()):
            raise ApiError(409, ALREADY_EXISTS, f"pipeline {name!r} already exists")
        pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name, "name": name,
                    "description": r.query.get("description", ""), "created_at": _now()}
        if namespace:
            pipeline["namespace"] = namespace
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._new_version(pipeline["pipeline_id"], name, pipeline["description"], text)  # the server's first
        return 200, "V2beta1Pipeline", pipeline

    def _upload_version(self, r: Request) -> tuple[int, str, Any]:
        text, name, pipeline_id = self._uploaded(r), r.query.get("name", ""), r.query.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            raise ApiError(404, NOT_FOUND, f"pipeline {pipeline_id!r} not found")
        if any(v["display_name"] == name for v in self.versions[pipeline_id]):
            raise ApiError(409, ALREADY_EXISTS, f"pipeline version {name!r} already exists")
        return 200, "V2beta1PipelineVersion", self._new_version(pipeline_id, name, r.query.get("description", ""),
                                                                text)

    def _list_versions(self, r: Request, pipeline_id: str) -> tuple[int, str, Any]:
        if pipeline_id not in self.pipelines:
            raise ApiError(404, NOT_FOUND, f"pipeline {pipeline_id!r} not found")
        name = self._filter_name(r)
        found = [v for v in self.versions[pipeline_id] if name in (None, v["display_name"])]
        return 200, "V2beta1ListPipelineVersionsResponse", (
            {"pipeline_versions": found, "total_size": len(found)} if found else {})

    def _list_experiments(self, r: Request) -> tuple[int, str, Any]:
        name, namespace = self._filter_name(r), r.query.get("namespace", "")
        found = [e for e in self.experiments.values()
                 if e.get("namespace", "") == namespace and name in (None, e["display_name"])]
        return 200, "V2beta1ListExperimentsResponse", {"experiments": found, "total_size": len(found)} if found else {}

    def _create_experiment(self, r: Request) -> tuple[int, str, Any]:
        body = self._checked(r.json, "V2beta1Experiment", "experiment")
        experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return 200, "V2beta1Experiment", experiment

    def _check_source(self, body: dict[str, Any]) -> None:
        """A run names an existing experiment and either an existing version or an inline spec."""
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(400, INVALID_ARGUMENT, f"experiment {body.get('experiment_id')!r} not found")
        reference = body.get("pipeline_version_reference")
        if bool(reference) == bool(body.get("pipeline_spec")):
            raise ApiError(400, INVALID_ARGUMENT, "a run needs exactly one of pipeline_spec and a version reference")
        if reference and not any(v["pipeline_version_id"] == reference.get("pipeline_version_id")
                                 for v in self.versions.get(reference.get("pipeline_id"), [])):
            raise ApiError(400, INVALID_ARGUMENT, f"pipeline version {reference} not found")

    def _create_run(self, r: Request) -> tuple[int, str, Any]:
        body = self._checked(r.json, "V2beta1Run", "run")
        self._check_source(body)
        run = {**body, "run_id": str(uuid.uuid4()), "created_at": _now(), "state": "PENDING",
               "storage_state": "AVAILABLE"}
        self.runs[run["run_id"]] = run
        return 200, "V2beta1Run", run

    def _get_run(self, r: Request, run_id: str) -> tuple[int, str, Any]:
        if run_id not in self.runs:
            raise ApiError(404, NOT_FOUND, f"run {run_id!r} not found")
        polls = self._polls[run_id] = self._polls.get(run_id, -1) + 1
        state = self.run_states[min(polls, len(self.run_states) - 1)]
        run = {**self.runs[run_id], "state": state}
        if state == "FAILED":
            run["error"] = {"code": 2, "message": self.run_error, "details": []}
        if state in ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"):
            run["finished_at"] = _now()
        return 200, "V2beta1Run", run

    def _create_recurring_run(self, r: Request) -> tuple[int, str, Any]:
        body = self._checked(r.json, "V2beta1RecurringRun", "recurring_run")
        self._check_source(body)
        job = {**body, "recurring_run_id": str(uuid.uuid4()), "created_at": _now(), "updated_at": _now(),
               "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED"}
        self.recurring_runs[job["recurring_run_id"]] = job
        return 200, "V2beta1RecurringRun", job
