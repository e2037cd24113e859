"""Upload the pipeline to Kubeflow Pipelines and start (or schedule) a run of it.

    python -m pipelines.submit --params params/paper-openai-l14-336.yaml [--set SECTION.KEY=VALUE ...]
        [--data-revision REV] [--cluster cpu|gpu|PATH] [--image TAG] [--gpu-image TAG] [--pipeline-root s3://bucket/root]
        [--experiment NAME] [--run-name NAME] [--namespace NS] [--service-account SA]
        [--pipeline-name llm2clip] [--version-name NAME] [--no-upload] [--no-cache]
        [--watch [--timeout SECONDS]] [--recurring "0 0 3 * * *"]
        [--host URL] [--token-file PATH] [--ca-cert PEM] [--kube-context CTX]

Before anything is sent, the params file and the cluster profile are validated and the
pipeline is compiled for the profile (exit 2 on any error there: a typo fails in seconds, not
hours into a GPU job). Then:

1. pipeline ``--pipeline-name`` is uploaded (or found: a pipeline is looked up by name in the
   namespace, never uploaded twice) and a *version* named ``<git rev 12>-<params hash 8>`` is
   added to it (the params hash is the sha256 of the JSON of the pipeline arguments). A version
   of that name is reused when it holds the same compiled spec; when it holds another one
   (another ``--cluster``, ``--no-cache`` or uncommitted code), the spec digest is appended to
   the default name (an explicit ``--version-name`` fails instead). KFP names the first version
   of a new pipeline after the pipeline itself;
2. the experiment (default ``common.experiment``) is created if missing;
3. a run of that version is started with one argument per params section (plus the image
   overrides), and its URL ``<host>/#/runs/details/<run id>`` is printed on stdout;
   ``--recurring CRON`` creates a recurring run instead (KFP cron: six fields, seconds first);
4. ``--watch`` polls the run until it ends or ``--timeout`` passes and prints the final state.

Exit status: 0 run created (with ``--watch``: it SUCCEEDED); 1 the run failed, was cancelled or
timed out, or the API refused / could not be reached (one line, no traceback); 2 a params,
profile or option error: nothing was sent.

Auth comes from the environment or the kube config, never from the repo:
- ``--host`` / ``$KFP_HOST``: the KFP API endpoint (e.g. ``https://kubeflow.example/pipeline``,
  ``http://ml-pipeline.kubeflow:8888`` in-cluster, ``http://127.0.0.1:8888`` after a
  ``kubectl port-forward``), with a bearer token from ``$KFP_TOKEN`` or, re-read at every
  request, from a file (``--token-file`` / ``$KFP_TOKEN_FILE``, e.g. a projected service-account
  token) and a CA bundle from ``--ca-cert`` / ``$KFP_CA_CERT``;
- no host: through the Kubernetes API server's service proxy to ``ml-pipeline`` in
  ``--kfp-namespace`` (default ``kubeflow``) with the credentials of the kube config context
  (``--kube-context``, default: the current one), or in a pod, to the in-cluster service with
  the pod's token.
The token is never printed or logged. Stdout carries the results only (the URL, the final
state); logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kfp
import urllib3
import yaml
from kfp.client.token_credentials_base import TokenCredentialsBase
from kfp_server_api.exceptions import ApiException

from llm2clip.cluster.profile import ClusterProfile, check_fit, load_cluster_profile
from llm2clip.config import ConfigError, load_params
from llm2clip.tracking import git_revision
from pipelines.compile import compile_pipeline
from pipelines.llm2clip_pipeline import (
    DEFAULT_PROFILE,
    PIPELINE_NAME,
    data_revision_override,
    pipeline_arguments,
    prepared_dataset,
)

log = logging.getLogger("pipelines.submit")

DEFAULT_TIMEOUT_S = 24 * 3600
DEFAULT_POLL_S = 30.0
SUCCEEDED = "SUCCEEDED"
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})
"""Run states (``V2beta1RuntimeState``) after which a run changes no more."""
MAX_POLL_ERRORS = 10
"""Consecutive transient errors (5xx, connection) a ``--watch`` rides out before giving up."""
AUTH_HINT = "set KFP_TOKEN or --kube-context"
_SPEC_DIGEST = re.compile(r"spec sha256:([0-9a-f]{64})")


class UsageError(Exception):
    """A bad option or missing auth setting, found before anything is sent (exit 2)."""


class SubmitError(Exception):
    """The API answered, but not what submit needs (exit 1)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line (kept separate so tests can read its defaults)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what runs")
    what.add_argument("--params", type=Path, required=True, help="params YAML, e.g. params/paper-openai-l14-336.yaml")
    what.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.KEY=VALUE", help="override one value (repeatable)")
    what.add_argument("--data-revision", metavar="REV",
                      help="git revision of the DVC-tracked data (common.data_revision): dvc sources without a "
                      "rev read at it; every task records it in MLflow and the registered model in a tag. Pin a "
                      "commit: KFP caches by the name, so a moved branch would reuse cached tasks")
    what.add_argument("--prepared-repo", metavar="REPO",
                      help="start from the prepared dataset this git + DVC repository versions (at "
                      "--data-revision) instead of running prepare_data")
    what.add_argument("--prepared-path", default="data/prepared", metavar="PATH",
                      help="the dataset's folder in --prepared-repo (default: %(default)s)")
    what.add_argument("--cluster", default=DEFAULT_PROFILE, metavar="cpu|gpu|PATH",
                      help="cluster profile: a name in params/cluster/ or a YAML path (default: %(default)s)")
    what.add_argument("--image", help="image of CPU tasks (default: this source tree's -cpu tag)")
    what.add_argument("--gpu-image", help="image of GPU tasks and TrainJob nodes (default: the -cu128 tag)")
    what.add_argument("--pipeline-root", help="artifact root, e.g. s3://bucket/pipeline-root (default: KFP's); "
                      "GPU/TrainJob profiles need one every pod can reach")
    what.add_argument("--no-cache", action="store_true", help="compile with KFP caching off for every task")

    where = p.add_argument_group("where it runs")
    where.add_argument("--experiment", help="KFP experiment, created if missing (default: common.experiment)")
    where.add_argument("--run-name", help="run name (default: '<pipeline> <version> <UTC time>')")
    where.add_argument("--namespace", help="Kubeflow profile namespace of the pipeline, experiment and run "
                       "(default: the cluster profile's; '' for a single-user KFP)")
    where.add_argument("--service-account", help="service account of the run's pods (default: the cluster "
                       "profile's; '' for KFP's default)")
    where.add_argument("--upload", action=argparse.BooleanOptionalAction, default=True,
                       help="upload the pipeline and a version and run that version; --no-upload sends the "
                       "compiled spec with the run only (default: upload)")
    where.add_argument("--pipeline-name", default=PIPELINE_NAME, help="pipeline to upload to (default: %(default)s)")
    where.add_argument("--version-name", help="pipeline version (default: '<git rev 12>-<params hash 8>', "
                       "params hash = sha256 of the JSON of the pipeline arguments)")

    when = p.add_argument_group("follow or schedule")
    when.add_argument("--watch", action="store_true",
                      help="follow the run to its end; exit 0 only when it SUCCEEDED")
    when.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                      help="give up watching after this long, exit 1 (default: %(default)d = 24 h)")
    when.add_argument("--poll", type=float, default=DEFAULT_POLL_S, metavar="SECONDS",
                      help="seconds between two status polls of --watch (default: %(default)g)")
    when.add_argument("--recurring", metavar="CRON",
                      help="create a recurring run instead of one run. KFP cron format: SIX fields, seconds "
                      "first ('S M H DoM Mon DoW'), e.g. '0 0 3 * * *' = daily at 03:00:00 in the KFP "
                      "scheduler's time zone (usually UTC), or a descriptor such as '@daily'; at most one "
                      "run at a time, missed runs are not caught up")

    auth = p.add_argument_group("connection and auth (from the environment, never from the repo)")
    auth.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST); without one, KFP is reached "
                      "through the Kubernetes API proxy of the kube config context or in-cluster")
    auth.add_argument("--token-file", type=Path, help="file holding a bearer token, re-read at each request, "
                      "e.g. a projected service-account token (default: $KFP_TOKEN_FILE; $KFP_TOKEN holds a "
                      "token itself)")
    auth.add_argument("--ca-cert", help="CA bundle to verify the host's TLS certificate (default: $KFP_CA_CERT)")
    auth.add_argument("--kube-context", help="kube config context whose credentials reach KFP through the "
                      "Kubernetes API proxy (not with --host)")
    auth.add_argument("--kfp-namespace", default="kubeflow",
                      help="namespace of KFP's ml-pipeline service for the Kubernetes API proxy "
                      "(default: %(default)s)")
    return p


# --------------------------------------------------------------------------------------------
# what to send (all of it checked before a connection is made)


@dataclass(frozen=True)
class Connection:
    """How to reach the KFP API: ``kfp.Client`` arguments (secrets inside: never log them)."""

    where: str
    client_kwargs: dict[str, Any]
    host: str | None = None
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything a submission sends, resolved and validated."""

    package: Path
    spec_digest: str
    arguments: dict[str, Any]
    params_digest: str
    profile: ClusterProfile
    pipeline_name: str
    version_name: str
    explicit_version: bool
    experiment: str
    run_name: str | None
    namespace: str | None
    service_account: str | None
    pipeline_root: str | None


def params_hash(arguments: dict[str, Any]) -> str:
    """sha256 (hex) of the pipeline arguments' canonical JSON: what the run computes from."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_version_name(revision: str, arguments: dict[str, Any]) -> str:
    """``<git rev 12>[-dirty]-<params hash 8>``: the code and the params of the run."""
    sha, dirty = revision.removesuffix("-dirty"), revision.endswith("-dirty")
    return f"{sha[:12]}{'-dirty' if dirty else ''}-{params_hash(arguments)[:8]}"


def check_cron(cron: str) -> None:
    """KFP's scheduler reads cron with a seconds field (6 fields) or a ``@`` descriptor."""
    fields = cron.split()
    if cron.strip().startswith("@") or len(fields) == 6:
        return
    hint = f" (KFP cron has a seconds field first: '0 {cron.strip()}')" if len(fields) == 5 else ""
    raise UsageError(f"--recurring {cron!r}: expected 6 fields 'S M H DoM Mon DoW' or a descriptor{hint}")


def resolve_connection(args: argparse.Namespace, env: dict[str, str] | os._Environ = os.environ) -> Connection:
    """Host, token, CA and context from the options and the environment; nothing is sent.

    Raises:
        UsageError: An unreadable token file or CA bundle, a token without a host, a kube
            config context that cannot be loaded, or no way to reach KFP at all.
    """
    host = args.host
    if args.kube_context and not host and env.get("KFP_HOST"):
        log.info("--kube-context given: $KFP_HOST is not used")
    elif not host:
        host = env.get("KFP_HOST") or None
    token_file = args.token_file or (None if env.get("KFP_TOKEN") else env.get("KFP_TOKEN_FILE"))
    token = None if args.token_file else (env.get("KFP_TOKEN") or None)
    secrets = [token] if token else []
    if token_file:
        token_file = Path(token_file)
        try:
            secrets.append(token_file.read_text().strip())
        except OSError as err:
            raise UsageError(f"cannot read token file {token_file}: {err.strerror}") from err
        if not secrets[-1]:
            raise UsageError(f"token file {token_file} is empty")
    if (token or token_file) and not host:
        raise UsageError("a bearer token ($KFP_TOKEN / --token-file) needs --host or $KFP_HOST; through the "
                         "Kubernetes API proxy the kube config context's own credentials are used")
    ca_cert = args.ca_cert or env.get("KFP_CA_CERT") or None
    if ca_cert and not Path(ca_cert).is_file():
        raise UsageError(f"CA bundle not found: {ca_cert}")
    if host:
        host = host.rstrip("/")
        kwargs: dict[str, Any] = {"host": host, "ssl_ca_cert": ca_cert}
        if token_file:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(str(token_file))  # read at each request
        elif token:
            kwargs["existing_token"] = token
        return Connection(host, kwargs, host, tuple(secrets))
    if _kube_config_files(env):
        return _kube_proxy(args.kube_context, args.kfp_namespace)
    if env.get("KUBERNETES_SERVICE_HOST") and not args.kube_context:
        # kfp's in-cluster default: ml-pipeline.<kfp namespace>.svc.cluster.local:8888, the pod's token
        return Connection(f"the in-cluster KFP service (namespace {args.kfp_namespace})",
                          {"namespace": args.kfp_namespace})
    raise UsageError("no KFP endpoint: pass --host or set $KFP_HOST, or have a kube config ($KUBECONFIG, "
                     "~/.kube/config) to reach KFP through the Kubernetes API proxy")


def _kube_config_files(env: dict[str, str] | os._Environ) -> list[Path]:
    paths = env.get("KUBECONFIG", "").split(os.pathsep) if env.get("KUBECONFIG") else ["~/.kube/config"]
    return [Path(p).expanduser() for p in paths if p and Path(p).expanduser().is_file()]


class KubeContextCredentials(TokenCredentialsBase):
    """The bearer token of a kube config context, for a ``kfp.Client`` whose host is the API
    server's service proxy; the kubernetes client refreshes it when it expires (exec plugins,
    OIDC).

    Why not ``kfp.Client(kube_context=...)``: for a user with a token, the kubernetes client
    installs a refresh hook that copies the cluster's bare URL back into the configuration
    before every request, so the client loses the proxy path and calls ``<apiserver>/apis/...``.
    """

    def __init__(self, kube: Any) -> None:
        self._kube = kube

    def refresh_api_key_hook(self, config: Any) -> None:
        if self._kube.refresh_api_key_hook is not None:
            self._kube.refresh_api_key_hook(self._kube)
        config.api_key["authorization"] = self._kube.api_key["authorization"].removeprefix("Bearer ")


def _kube_proxy(context: str | None, kfp_namespace: str) -> Connection:
    """Reach KFP's ml-pipeline service through the Kubernetes API server of a kube config context."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    kube = k8s_client.Configuration()
    try:
        k8s_config.load_kube_config(context=context, client_configuration=kube)
    except (k8s_config.ConfigException, OSError, ValueError) as err:
        raise UsageError(f"cannot load kube config context {context or '(current)'}: {err}") from err
    where = f"the Kubernetes API proxy of kube context {context or '(current)'}"
    token = kube.api_key.get("authorization", "")
    if not token:  # client certificates: kfp's own loader keeps the proxy path (no token hook)
        return Connection(where, {"kube_context": context, "namespace": kfp_namespace})
    host = f"{kube.host.rstrip('/')}/api/v1/namespaces/{kfp_namespace}/services/ml-pipeline:http/proxy"
    kwargs = {"host": host, "ssl_ca_cert": kube.ssl_ca_cert, "verify_ssl": kube.verify_ssl,
              "credentials": KubeContextCredentials(kube)}
    return Connection(where, kwargs, None, (token.removeprefix("Bearer "),))


def prepare(args: argparse.Namespace, workdir: Path) -> Plan:
    """Validate params and profile, compile the pipeline into ``workdir``; nothing is sent.

    Raises:
        ConfigError: Bad params or cluster profile.
        UsageError: A bad option value.
    """
    if args.recurring:
        check_cron(args.recurring)
    if args.timeout <= 0 or args.poll <= 0:
        raise UsageError("--timeout and --poll must be > 0")
    params = load_params(args.params, args.overrides + data_revision_override(args.data_revision))
    if args.data_revision and not args.no_cache and not re.fullmatch(r"[0-9a-f]{40}", args.data_revision):
        log.warning("--data-revision %s is not a full commit sha: KFP's cache key holds the name, so a later run "
                    "naming it reuses cached tasks even after it moved; pass `git rev-parse %s` or --no-cache",
                    args.data_revision, args.data_revision)
    profile = load_cluster_profile(args.cluster)
    check_fit(profile, params)
    try:
        arguments = pipeline_arguments(params, {"image": args.image, "gpu_image": args.gpu_image},
                                       prepared_dataset(args.prepared_repo, args.prepared_path, params))
    except RuntimeError as err:
        raise ConfigError(str(err)) from err
    package = compile_pipeline(workdir / "llm2clip_pipeline.yaml", args.cluster, bool(args.prepared_repo))
    if args.no_cache:
        disable_caching(package)
    if not args.pipeline_root and any(t.gpu or t.launcher == "trainjob" for t in profile.tasks.values()):
        log.warning("cluster profile %s runs GPU pods / TrainJobs, whose outputs every pod must reach: pass "
                    "--pipeline-root s3://<bucket>/pipeline-root (KFP's default root is used now)", profile.name)
    digest = params_hash(arguments)
    version = args.version_name or default_version_name(git_revision(), arguments)
    namespace = profile.namespace if args.namespace is None else args.namespace
    service_account = profile.service_account if args.service_account is None else args.service_account
    return Plan(
        package=package, spec_digest=hashlib.sha256(package.read_bytes()).hexdigest(), arguments=arguments,
        params_digest=digest, profile=profile, pipeline_name=args.pipeline_name, version_name=version,
        explicit_version=bool(args.version_name), experiment=args.experiment or params.common.experiment,
        run_name=args.run_name, namespace=namespace or None, service_account=service_account or None,
        pipeline_root=args.pipeline_root or None,
    )


def disable_caching(package: Path) -> None:
    """Turn KFP caching off for every task of a compiled pipeline (the IR, not a run option:
    a run of an uploaded version cannot override it)."""
    docs = list(yaml.safe_load_all(package.read_text()))
    for task in docs[0]["root"]["dag"]["tasks"].values():
        task.setdefault("cachingOptions", {})["enableCache"] = False
    package.write_text(yaml.safe_dump_all(docs, sort_keys=False))


# --------------------------------------------------------------------------------------------
# talking to KFP


def make_client(conn: Connection, namespace: str | None) -> kfp.Client:
    """A ``kfp.Client`` for ``conn`` (its constructor's own prints go wherever stdout goes)."""
    kwargs = dict(conn.client_kwargs)
    if "host" in kwargs:
        # a namespace other than "kubeflow" spares the constructor's healthz probe (it only looks
        # for a pod's own namespace); every call below passes its namespace explicitly anyway
        kwargs["namespace"] = namespace or "kubeflow"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(**kwargs)


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": name}]})


def find_pipeline(client: kfp.Client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline named ``name`` in ``namespace``, or None."""
    found = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=2).pipelines or []
    found = [p for p in found if p.display_name == name]
    if len(found) > 1:
        raise SubmitError(f"{len(found)} pipelines are named {name!r}: pass another --pipeline-name")
    return found[0].pipeline_id if found else None


def find_version(client: kfp.Client, pipeline_id: str, name: str) -> Any:
    """The ``V2beta1PipelineVersion`` named ``name`` of the pipeline, or None."""
    found = client.list_pipeline_versions(pipeline_id, filter=_name_filter(name), page_size=2)
    return next((v for v in found.pipeline_versions or [] if v.display_name == name), None)


def ensure_pipeline(client: kfp.Client, plan: Plan) -> str:
    """Find the pipeline by name, or upload it; its id."""
    pipeline_id = find_pipeline(client, plan.pipeline_name, plan.namespace)
    if pipeline_id:
        log.info("pipeline %s exists (%s)", plan.pipeline_name, pipeline_id)
        return pipeline_id
    try:
        pipeline = client.upload_pipeline(str(plan.package), pipeline_name=plan.pipeline_name,
                                          description="LLM2CLIP (python -m pipelines.submit)",
                                          namespace=plan.namespace)
    except ApiException as err:
        if err.status != 409:  # uploaded meanwhile by someone else: use theirs
            raise
        pipeline_id = find_pipeline(client, plan.pipeline_name, plan.namespace)
        if not pipeline_id:
            raise
        return pipeline_id
    log.info("uploaded pipeline %s (%s)", plan.pipeline_name, _id(pipeline.pipeline_id, "the uploaded pipeline"))
    return pipeline.pipeline_id


def ensure_version(client: kfp.Client, pipeline_id: str, plan: Plan) -> tuple[str, str]:
    """Reuse or upload the version holding this compiled spec; ``(version id, version name)``."""
    names = [plan.version_name]
    if not plan.explicit_version:
        names.append(f"{plan.version_name}-{plan.spec_digest[:8]}")
    description = (f"git {git_revision()}; cluster profile {plan.profile.name}; "
                   f"params sha256:{plan.params_digest}; spec sha256:{plan.spec_digest}")
    for name in names:
        for _attempt in range(2):
            version = find_version(client, pipeline_id, name)
            if version is None:
                try:
                    version = client.upload_pipeline_version(str(plan.package), name, pipeline_id=pipeline_id,
                                                             description=description)
                except ApiException as err:
                    if err.status == 409:  # created meanwhile: look again
                        continue
                    raise
                log.info("uploaded pipeline version %s (%s)", name,
                         _id(version.pipeline_version_id, "the uploaded version"))
                return version.pipeline_version_id, name
            recorded = _SPEC_DIGEST.search(version.description or "")
            if recorded is None:
                log.warning("pipeline version %s was not uploaded by pipelines.submit (no spec digest in its "
                            "description): reusing it as it is", name)
                return version.pipeline_version_id, name
            if recorded.group(1) == plan.spec_digest:
                log.info("pipeline version %s exists with this spec: reusing it", name)
                return version.pipeline_version_id, name
            log.info("pipeline version %s holds another compiled spec (cluster profile, --no-cache or code)", name)
            break
    raise SubmitError(f"pipeline version {plan.version_name!r} already holds another compiled spec (another "
                      "--cluster, --no-cache or changed code): pass another --version-name")


def _id(value: str | None, what: str) -> str:
    """An id the API must have answered with; without one, something else answered (e.g. the
    login page of the cluster's auth proxy, which kfp reads as an empty object)."""
    if not value:
        raise SubmitError(f"the API answered without an id for {what}: is a login page in front of it? "
                          f"({AUTH_HINT})")
    return value


def start(client: kfp.Client, plan: Plan, recurring: str | None, upload: bool) -> tuple[str, str]:
    """Upload as needed and create the run (or recurring run); ``(kind, id)``."""
    source: dict[str, Any] = {"pipeline_package_path": str(plan.package)}
    if upload:
        pipeline_id = ensure_pipeline(client, plan)
        version_id, version_name = ensure_version(client, pipeline_id, plan)
        source = {"pipeline_id": pipeline_id, "version_id": version_id}
    else:
        version_name = plan.version_name
    stamp = "recurring" if recurring else datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    run_name = plan.run_name or f"{plan.pipeline_name} {version_name} {stamp}"
    experiment = client.create_experiment(plan.experiment, namespace=plan.namespace)
    _id(experiment.experiment_id, "the experiment")
    common = {"experiment_id": experiment.experiment_id, "job_name": run_name, "params": plan.arguments,
              "pipeline_root": plan.pipeline_root, "service_account": plan.service_account, **source}
    where = f"experiment {plan.experiment} ({experiment.experiment_id})"
    if recurring:
        job = client.create_recurring_run(cron_expression=recurring, max_concurrency=1, no_catchup=True,
                                          description=f"pipeline version {version_name}", **common)
        log.info("created recurring run %r (%s) in %s, cron %r", run_name, _id(job.recurring_run_id, "the run"), where,
                 recurring)
        return "recurring", job.recurring_run_id
    run = client.run_pipeline(**common)
    log.info("created run %r (%s) of %s in %s", run_name, _id(run.run_id, "the run"),
             f"version {version_name}" if upload else "the compiled spec (not uploaded)", where)
    return "run", run.run_id


def watch(client: kfp.Client, run_id: str, timeout_s: float, poll_s: float) -> tuple[str, str, bool]:
    """Poll the run until it ends or ``timeout_s`` passes; ``(last state, its error message, ended)``."""
    deadline = time.monotonic() + timeout_s
    state, errors = "", 0
    while True:
        try:
            run = client.get_run(run_id)
        except (ApiException, urllib3.exceptions.HTTPError) as err:
            status = getattr(err, "status", None)
            if (status is not None and status < 500) or errors >= MAX_POLL_ERRORS:
                raise
            errors += 1
            log.warning("polling run %s failed (%s); trying again", run_id, describe_error(err))
        else:
            errors = 0
            if str(run.state or "PENDING") != state:
                state = str(run.state or "PENDING")
                log.info("run %s: %s", run_id, state)
            if state in FINAL_STATES:
                return state, (run.error.message if run.error and run.error.message else ""), True
        left = deadline - time.monotonic()
        if left <= 0:
            return state or "unknown", "", False
        time.sleep(min(poll_s, left))


def describe_error(err: BaseException) -> str:
    """One line for an API or connection error."""
    if isinstance(err, ApiException):
        message = ""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(err.body).get("message") or ""
        detail = f"HTTP {err.status} {err.reason or ''}".strip() + (f": {message}" if message else "")
        if err.status in (401, 403):
            return f"not authorised ({detail}): {AUTH_HINT}"
        return f"KFP API error ({detail})"
    if isinstance(err, urllib3.exceptions.MaxRetryError):
        return f"cannot reach the KFP API: {err.reason}"
    return f"{type(err).__name__}: {err}"


class _Redact(logging.Filter):
    """Belt and braces: replaces secret values in every record a handler emits."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (exit 0 / 1 / 2: see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recurring and args.watch:
        parser.error("--watch follows one run; a --recurring schedule has none to follow")
    if args.kube_context and args.host:
        parser.error("--kube-context reaches KFP through the Kubernetes API proxy; it cannot go with --host")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="llm2clip-submit-") as tmp:
        try:
            conn = resolve_connection(args)
            plan = prepare(args, Path(tmp))
        except (ConfigError, UsageError) as err:
            log.error("%s (nothing was submitted)", err)
            return 2
        redact = _Redact(list(conn.secrets))
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(redact)
        try:
            return _submit(args, conn, plan)
        finally:
            for handler in handlers:
                handler.removeFilter(redact)


def _submit(args: argparse.Namespace, conn: Connection, plan: Plan) -> int:
    log.info("submitting %s version %s (cluster profile %s, params sha256 %s) to %s", plan.pipeline_name,
             plan.version_name, plan.profile.name, plan.params_digest[:8], conn.where)
    ui = (os.environ.get("KF_PIPELINES_UI_ENDPOINT") or conn.host or "").rstrip("/")
    if not ui:
        log.info("set $KF_PIPELINES_UI_ENDPOINT to the KFP UI's URL for full run links")
    out = sys.stdout  # results only; logs go to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr):  # kfp prints its own links: stdout is ours
            client = make_client(conn, plan.namespace)
            kind, ident = start(client, plan, args.recurring, args.upload)
            url = f"{ui}/#/{'recurringrun' if kind == 'recurring' else 'runs'}/details/{ident}"
            print(url, file=out, flush=True)
            if not args.watch:
                return 0
            state, message, ended = watch(client, ident, args.timeout, args.poll)
    except (ApiException, urllib3.exceptions.HTTPError) as err:
        log.error("%s", describe_error(err))
        return 1
    except (SubmitError, ValueError, TimeoutError, OSError) as err:
        log.error("%s", err)
        return 1
    if not ended:
        log.error("timed out after %g s waiting for run %s (last state %s); the run goes on on the cluster: %s",
                  args.timeout, ident, state, url)
        print(f"final state: {state} (timed out)", file=out, flush=True)
        return 1
    print(f"final state: {state}", file=out, flush=True)
    if state != SUCCEEDED:
        log.error("run %s ended %s%s", ident, state, f": {message}" if message else "")
        return 1
    log.info("run %s SUCCEEDED", ident)
    return 0


if __name__ == "__main__":
    sys.exit(main())
