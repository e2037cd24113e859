"""Run a training stage as a multi-node Kubeflow Trainer v2 TrainJob, from inside a KFP task.

:func:`build_trainjob` is a pure function from (stage, configs, URIs, image, cluster profile, run id)
to a ``trainer.kubeflow.org/v1alpha1`` TrainJob. :func:`run_trainjob` creates it (or adopts the one
a previous attempt of the same KFP task created), follows the rank-0 pod's log, waits for
``Complete``/``Failed``, deletes the job on SIGTERM or timeout, and finally verifies the output
manifest the workers wrote at the ``s3://`` output URI. Each node runs::

    torchrun -m llm2clip <stage> --common-json ... --config-json ... --<input> s3://... --<output> s3://...

with ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_NPROC_PER_NODE`` set by the Trainer's
torch policy, so every process calls the same ``llm2clip.stages.<stage>.run`` as ``dvc repro`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from llm2clip.cluster.k8s import (
    GROUP,
    NODE,
    VERSION,
    PodLogFollower,
    TrainJobApi,
    TrainJobCancelled,
    TrainJobError,
    TrainJobFailed,
    TrainJobNotFound,
    TrainJobTimeout,
    cancel_on_sigterm,
    condition,
    describe,
    load_api_client,
    make_sink,
    wait_for_trainjob,
)
from llm2clip.cluster.profile import TRAINING_STAGES, ClusterProfile

__all__ = [
    "TrainJobCancelled", "TrainJobError", "TrainJobFailed", "TrainJobTimeout",
    "build_trainjob", "run_trainjob", "to_s3_uri", "trainjob_name",
]

log = logging.getLogger(__name__)
rank0_log = logging.getLogger("llm2clip.cluster.trainjob.rank0")

PATCH_MANAGER = "llm2clip.trainjob-launcher"
"""``runtimePatches[].manager`` of the patch this launcher writes (node selector, tolerations, shm...)."""
SHM_VOLUME = "dshm"
"""Name of the memory-backed ``/dev/shm`` volume; the runtime in manifests/ uses the same name, so the
patch resizes the runtime's volume (list-map merge by name) instead of mounting ``/dev/shm`` twice."""
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LOG_DRAIN_S = 30.0  # after Complete/Failed: how long the rank-0 log stream may take to end by itself
_DELETE_WAIT_S = 300.0  # how long a failed job of an earlier attempt may take to go away


def to_s3_uri(uri: str) -> str:
    """``minio://bucket/key`` (KFP's default artifact store) -> ``s3://bucket/key``; ``s3://`` unchanged.

    The endpoint of the MinIO service goes into ``common.s3_endpoint_url`` (or ``AWS_ENDPOINT_URL``
    from the S3 secret); any other scheme or a local path is returned unchanged, for
    :func:`build_trainjob` to refuse.
    """
    return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri


def _label_value(text: str) -> str:
    """A valid label value (<= 63 chars of ``[A-Za-z0-9._-]``, alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("-._")


def trainjob_name(pipeline_run_id: str, stage: str, cfg_hash: str, uris: dict[str, str]) -> str:
    """Deterministic TrainJob name: ``l2c-<stage>-<12 hex>`` of run id, stage, config hash and URIs.

    A KFP retry of the same task computes the same name, so it finds (and adopts) the job the
    first attempt created instead of starting a second one. The result is a DNS-1035 label.
    """
    key = json.dumps([pipeline_run_id, stage, cfg_hash, sorted(uris.items())], separators=(",", ":"))
    name = f"l2c-{stage.replace('_', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if len(name) > 63 or not _DNS_1035.match(name):
        raise ValueError(f"stage {stage!r} gives an invalid TrainJob name {name!r}")
    return name


def _check_uris(stage: str, uris: dict[str, str]) -> dict[str, str]:
    """The stage's inputs then outputs, in registry order; each must be ``s3://``."""
    from llm2clip.stages import STAGES

    names = STAGES[stage].inputs + STAGES[stage].outputs
    if set(uris) != set(names):
        raise ValueError(f"{stage} needs URIs for exactly {list(names)}, got {sorted(uris)}")
    for name in names:
        uri = uris[name]
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            hint = " (map it with to_s3_uri first)" if uri.startswith("minio://") else ""
            raise ValueError(
                f"{stage}: {name}={uri!r} is not an s3:// URI{hint}. TrainJob nodes do not share the KFP "
                "pod's disk: inputs and outputs must live on S3 (pipeline_root s3://... or minio://)")
    return {name: uris[name] for name in names}


def _env(profile: ClusterProfile, pipeline_run_id: str) -> list[dict]:
    """Secret env vars as ``secretKeyRef``\\ s plus the on-cluster markers; a duplicate name is an error."""
    env: list[dict] = []
    for source in profile.secrets:
        for var, key in source.env.items():
            ref = {"name": source.secret, "key": key, **({"optional": True} if source.optional else {})}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    env += [{"name": "LLM2CLIP_ON_CLUSTER", "value": "1"},
            {"name": "LLM2CLIP_PIPELINE_RUN_ID", "value": pipeline_run_id},
            {"name": "PYTHONUNBUFFERED", "value": "1"}]
    names = [e["name"] for e in env]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"cluster profile secrets: env var {duplicates[0]} is set twice")
    return env


def _runtime_patch(profile: ClusterProfile, stage: str, labels: dict[str, str]) -> dict:
    """The ``runtimePatches`` entry: pod labels, node placement, service account, ``/dev/shm`` size.

    The security context (non-root uid, fsGroup, seccomp, dropped capabilities) is the runtime's
    (manifests/base/trainingruntime.yaml) and is not patched: a patched ``securityContext`` may
    replace the runtime's whole object. ``/dev/shm`` is the runtime's ``dshm`` volume, resized here
    (volumes and volumeMounts merge by name).
    """
    task = profile.task(stage)
    pod: dict[str, Any] = {}
    if task.node_selector:
        pod["nodeSelector"] = dict(task.node_selector)
    if task.tolerations:
        pod["tolerations"] = [t.to_k8s() for t in task.tolerations]
    if profile.service_account:
        pod["serviceAccountName"] = profile.service_account
    if task.shm_size:
        pod["volumes"] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": task.shm_size}}]
        shm = {"name": SHM_VOLUME, "mountPath": "/dev/shm"}  # nosec B108  # a memory-backed mount, no temp file
        pod["containers"] = [{"name": NODE, "volumeMounts": [shm]}]
    node_job = {"name": NODE, "template": {"spec": {"template": {"metadata": {"labels": labels}, "spec": pod}}}}
    return {"manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}}}


def build_trainjob(*, stage: str, common: dict, config: dict, uris: dict[str, str], image: str,
                   profile: ClusterProfile, pipeline_run_id: str) -> dict:
    """The TrainJob that runs ``stage`` on ``profile.task(stage).num_nodes`` nodes (pure function).

    Args:
        stage: ``caption_contrastive`` or ``train_vision``.
        common, config: The ``common`` and stage sections as plain dicts (validated here; the nodes
            get the normalised, complete sections).
        uris: ``{input/output name: s3://...}`` for every input and output of the stage.
        image: The container image of the nodes (the GPU tag on a GPU profile).
        profile: The cluster profile (namespace, runtime, secrets, per-node resources, placement).
        pipeline_run_id: The KFP run id (name, labels, ``LLM2CLIP_PIPELINE_RUN_ID``, MLflow lineage).

    Returns:
        A ``trainer.kubeflow.org/v1alpha1`` TrainJob as a dict.

    Raises:
        ValueError: Not a training stage, missing/extra URIs, a URI that is not ``s3://``, an env
            var set twice. ``ConfigError`` (a ValueError) for invalid sections.
    """
    from llm2clip.config import config_hash, load_sections, to_dict

    if stage not in TRAINING_STAGES:
        raise ValueError(f"only {' and '.join(TRAINING_STAGES)} run as a TrainJob, not {stage!r}")
    cfg, common_cfg = load_sections(stage, common, config)
    uris = _check_uris(stage, uris)
    task, chash = profile.task(stage), config_hash(common_cfg, cfg)
    name = trainjob_name(pipeline_run_id, stage, chash, uris)
    labels = {"app.kubernetes.io/part-of": "llm2clip", "llm2clip/stage": stage}
    if pipeline_run_id:
        labels["llm2clip/pipeline-run-id"] = _label_value(pipeline_run_id)
    args = ["--common-json", json.dumps(to_dict(common_cfg), sort_keys=True),
            "--config-json", json.dumps(to_dict(cfg), sort_keys=True)]
    for key, uri in uris.items():
        args += [f"--{key.replace('_', '-')}", uri]
    args += ["--pipeline-run-id", pipeline_run_id]
    resources = {k: v for k, v in task.resources().items() if v}
    trainer = {"image": image, "command": ["torchrun", "-m", "llm2clip", stage], "args": args,
               "numNodes": task.num_nodes, "numProcPerNode": cfg.nproc_per_node,
               **({"resourcesPerNode": resources} if resources else {}),
               "env": _env(profile, pipeline_run_id)}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": profile.trainjob_runtime, "kind": "TrainingRuntime", "apiGroup": GROUP},
        "trainer": trainer,
        "runtimePatches": [_runtime_patch(profile, stage, labels)],
    }
    if task.timeout_s:
        spec["activeDeadlineSeconds"] = task.timeout_s
    metadata = {"name": name, "namespace": profile.namespace,
                "labels": {**labels, "llm2clip/config-hash": chash},
                "annotations": {"llm2clip/outputs": json.dumps({k: uris[k] for k in _outputs(stage)})}}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": metadata, "spec": spec}


def _outputs(stage: str) -> tuple[str, ...]:
    from llm2clip.stages import STAGES

    return STAGES[stage].outputs


def spec_matches(ours: Any, theirs: Any) -> bool:
    """True when every field we set is in ``theirs`` with the same value.

    Fields only the server adds (defaults, ``runtimePatches[].time`` from the admission webhook)
    are ignored, so a job the same task created before compares equal.
    """
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and all(k in theirs and spec_matches(v, theirs[k]) for k, v in ours.items())
    if isinstance(ours, list):
        return (isinstance(theirs, list) and len(ours) == len(theirs)
                and all(spec_matches(a, b) for a, b in zip(ours, theirs, strict=True)))
    return ours == theirs


# --------------------------------------------------------------------------------------------
# running: create or adopt, wait, verify


def _create_or_adopt(api: TrainJobApi, job: dict, poll_s: float) -> None:
    """Create ``job``; on 409 adopt the existing one if its spec matches (a KFP retry of the same task).

    An existing job that already ``Failed`` is deleted and created again: a retry is meant to run
    again, and the stage resumes from its last S3 checkpoint.
    """
    name = job["metadata"]["name"]
    try:
        api.create(job)
        log.info("created TrainJob %s/%s (%d node(s) x %d process(es))", api.namespace, name,
                 job["spec"]["trainer"]["numNodes"], job["spec"]["trainer"]["numProcPerNode"])
        return
    except TrainJobError as err:
        if err.status != 409:
            raise
    existing = api.get(name)
    if not spec_matches(job["spec"], existing.get("spec")):
        raise TrainJobError(
            f"TrainJob {api.namespace}/{name} exists with a different spec than this task would create "
            f"(another image or profile?); delete it (kubectl -n {api.namespace} delete trainjob {name}) and retry")
    if condition(existing, "Failed") is None:
        log.info("adopted the existing TrainJob %s/%s (%s)", api.namespace, name, describe(existing))
        return
    log.warning("TrainJob %s failed in an earlier attempt (%s): deleting and creating it again", name,
                describe(existing))
    api.delete(name)
    deadline = time.monotonic() + _DELETE_WAIT_S
    while time.monotonic() < deadline:
        try:
            api.get(name)
        except TrainJobNotFound:
            api.create(job)
            log.info("created TrainJob %s/%s again", api.namespace, name)
            return
        time.sleep(poll_s)
    raise TrainJobError(f"TrainJob {name} was not deleted within {_DELETE_WAIT_S:.0f} s; delete it by hand and retry")


def _verify_outputs(stage: str, job: dict, uris: dict[str, str], endpoint_url: str) -> dict[str, Any]:
    """Read each output's manifest; the stage and config hash must be the ones the job ran."""
    from llm2clip.io import StageError, read_manifest
    from llm2clip.stages import manifest_metadata

    expected = job["metadata"]["labels"]["llm2clip/config-hash"]
    summary: dict[str, Any] = {}
    for out in _outputs(stage):
        uri = uris[out]
        try:
            manifest = read_manifest(uri, endpoint_url)
        except StageError as err:
            raise TrainJobError(f"{stage}: the TrainJob completed but wrote no output manifest: {err}") from err
        if manifest.get("stage") != stage or manifest.get("config_hash") != expected:
            raise TrainJobError(
                f"{stage}: {uri}/manifest.json is stage {manifest.get('stage')!r} with config_hash "
                f"{manifest.get('config_hash')!r}, but the TrainJob ran {stage} with config_hash {expected!r}: "
                "a stale or foreign output")
        prefix = f"{out}_" if len(_outputs(stage)) > 1 else ""
        summary.update({f"{prefix}{k}": v for k, v in manifest_metadata(manifest).items()})
    return summary


def run_trainjob(stage: str, common: dict, config: dict, uris: dict[str, str], *, image: str,
                 profile: ClusterProfile, pipeline_run_id: str, api_client: Any = None,
                 log_sink: Any = rank0_log, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``stage`` as a TrainJob and wait for it; what a KFP training component calls.

    Args:
        stage, common, config, uris, image, profile, pipeline_run_id: As for :func:`build_trainjob`
            (``minio://`` URIs are mapped to ``s3://`` here).
        api_client: A ``kubernetes.client.ApiClient``; None: the pod's service account, else kube config.
        log_sink: Where the rank-0 pod's log lines go: a logger (``.info``) or a ``str -> None``.
        timeout_s: Give up (and delete the job) after this many seconds; None: the task's
            ``timeout_s`` (0: wait as long as it takes).

    Returns:
        Scalars for the output artifact's metadata: ``trainjob``, ``num_nodes``, ``nproc_per_node``,
        ``world_size``, ``config_hash`` and the output manifest's scalar fields.

    Raises:
        TrainJobFailed: The job failed (its own reason and message).
        TrainJobCancelled: SIGTERM while waiting (the job was deleted).
        TrainJobTimeout: ``timeout_s`` passed (the job was deleted).
        TrainJobError: RBAC, Trainer not installed, a conflicting job, a missing or foreign manifest.
    """
    from llm2clip.cluster import crds
    from llm2clip.config import load_sections

    uris = {k: to_s3_uri(v) for k, v in uris.items()}
    job = build_trainjob(stage=stage, common=common, config=config, uris=uris, image=image,
                         profile=profile, pipeline_run_id=pipeline_run_id)
    crds.validate(job)
    name, poll_s = job["metadata"]["name"], profile.trainjob_poll_s
    timeout_s = (profile.task(stage).timeout_s or None) if timeout_s is None else timeout_s
    api = TrainJobApi(api_client if api_client is not None else load_api_client(), profile.namespace)
    follower = PodLogFollower(api, name, poll_s, make_sink(log_sink))
    try:
        with cancel_on_sigterm(f"TrainJob {name}"):
            _create_or_adopt(api, job, poll_s)
            follower.start()
            wait_for_trainjob(api, name, poll_s, timeout_s)
    except TrainJobFailed:
        follower.finish(_LOG_DRAIN_S)
        raise
    except (TrainJobCancelled, TrainJobTimeout, KeyboardInterrupt):
        follower.stop()
        _delete_quietly(api, name)
        raise
    except BaseException:  # RBAC, API errors: the job (if any) keeps running for a retry to adopt
        follower.stop()
        raise
    follower.finish(_LOG_DRAIN_S)
    _, common_cfg = load_sections(stage, common, config)
    trainer = job["spec"]["trainer"]
    summary = _verify_outputs(stage, job, uris, common_cfg.s3_endpoint_url)
    world = trainer["numNodes"] * trainer["numProcPerNode"]
    if summary.get("training.world_size", world) != world:
        log.warning("%s: the manifest says world size %s, the TrainJob had %d", stage,
                    summary["training.world_size"], world)
    log.info("TrainJob %s complete; %s verified (config_hash %s)", name, stage, summary["config_hash"])
    return {**summary, "trainjob": name, "num_nodes": trainer["numNodes"],
            "nproc_per_node": trainer["numProcPerNode"], "world_size": world}


def _delete_quietly(api: TrainJobApi, name: str) -> None:
    """Delete the job on the way out; a failure is logged (the original error is what matters)."""
    try:
        api.delete(name)
        log.warning("deleted TrainJob %s/%s", api.namespace, name)
    except TrainJobNotFound:
        pass
    except Exception as err:
        log.error("could not delete TrainJob %s/%s: %s; delete it by hand", api.namespace, name, err)
