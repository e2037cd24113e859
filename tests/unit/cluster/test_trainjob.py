"""The TrainJob launcher: build_trainjob (pure, strict CRD schema) and run_trainjob end to end against a
loopback Kubernetes API (fake_k8s) plus a moto S3 server for the output manifest."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_k8s import FakeK8s, FakePod, Step, complete, failed, jobs_status, running

from llm2clip.cluster import crds
from llm2clip.cluster.profile import ClusterProfile, SecretEnv, TaskProfile, Toleration
from llm2clip.cluster.trainjob import (
    TrainJobError,
    TrainJobFailed,
    TrainJobTimeout,
    build_trainjob,
    run_trainjob,
    to_s3_uri,
)
from llm2clip.config import config_hash, from_dict, load_sections, to_dict

REPO = Path(__file__).resolve().parents[3]
STAGE = "train_vision"
CONFIG = {"nproc_per_node": 2, "batch_size": 8}
SECRETS = (SecretEnv("llm2clip-s3", {"AWS_ACCESS_KEY_ID": "access-key", "AWS_SECRET_ACCESS_KEY": "secret-key"}),
           SecretEnv("llm2clip-mlflow", {"MLFLOW_TRACKING_URI": "uri"}, optional=True))


def make_profile(poll_s: float = 0.02, **task) -> ClusterProfile:
    gpu = TaskProfile(launcher="trainjob", num_nodes=2, accelerator_type="nvidia.com/gpu", accelerator_count=2,
                      node_selector={"pool": "gpu"}, shm_size="8Gi", timeout_s=7200,
                      tolerations=(Toleration(key="nvidia.com/gpu", effect="NoSchedule"),), **task)
    return ClusterProfile(trainjob_poll_s=poll_s, secrets=SECRETS, tasks={STAGE: gpu})


def uris(bucket: str = "b") -> dict[str, str]:
    return {"data": f"s3://{bucket}/data", "embeddings": f"s3://{bucket}/embeddings",
            "vision_model": f"s3://{bucket}/vision_model"}


def build(**over):
    kwargs = {"stage": STAGE, "common": {}, "config": CONFIG, "uris": uris(), "image": "llm2clip:1-cu128",
              "profile": make_profile(), "pipeline_run_id": "run-1234", **over}
    return build_trainjob(**kwargs)


# ------------------------------------------------------------------------------------ build


def test_build_validates_strictly_and_carries_the_profile():
    job = build()
    crds.validate(job)
    trainer, spec = job["spec"]["trainer"], job["spec"]
    assert trainer["command"] == ["torchrun", "-m", "llm2clip", STAGE]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["runtimeRef"] == {"name": "llm2clip-torch", "kind": "TrainingRuntime",
                                  "apiGroup": "trainer.kubeflow.org"}
    assert spec["activeDeadlineSeconds"] == 7200
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = pod["template"]["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"pool": "gpu"}
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod_spec["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod_spec["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    assert pod_spec["serviceAccountName"] == "llm2clip-pipeline"
    assert "securityContext" not in pod_spec  # the runtime's (manifests/base/trainingruntime.yaml)
    args = trainer["args"]
    assert args[args.index("--vision-model") + 1] == "s3://b/vision_model"
    assert args[args.index("--pipeline-run-id") + 1] == "run-1234"
    cfg, common = load_sections(STAGE, json.loads(args[1]), json.loads(args[3]))
    assert job["metadata"]["labels"]["llm2clip/config-hash"] == config_hash(common, cfg)
    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    with pytest.raises(crds.CRDValidationError, match="numNode"):
        crds.validate(typo)


def test_no_standalone_torchrun_and_the_cli_parses_the_args():
    from llm2clip.cli import build_parser

    trainer = build()["spec"]["trainer"]
    assert trainer["command"][0] == "torchrun"
    assert not any("standalone" in a for a in trainer["command"] + trainer["args"])
    args = build_parser().parse_args(trainer["command"][3:] + trainer["args"])
    assert (args.stage, args.vision_model, args.pipeline_run_id) == (STAGE, "s3://b/vision_model", "run-1234")


def test_name_is_deterministic_and_a_dns_label():
    name = build()["metadata"]["name"]
    assert name == build()["metadata"]["name"]
    assert name.startswith("l2c-train-vision-") and len(name) <= 63
    assert build(config={**CONFIG, "batch_size": 16})["metadata"]["name"] != name
    assert build(pipeline_run_id="run-5678")["metadata"]["name"] != name
    assert build(uris={**uris(), "vision_model": "s3://b/other"})["metadata"]["name"] != name
    long_id = "Run/" + "x" * 100
    labels = build(pipeline_run_id=long_id)["metadata"]["labels"]
    assert len(labels["llm2clip/pipeline-run-id"]) <= 63
    crds.validate(build(pipeline_run_id=long_id))


def test_secrets_are_secret_key_refs():
    env = {e["name"]: e for e in build()["spec"]["trainer"]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "llm2clip-s3", "key": "secret-key"}}}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["LLM2CLIP_ON_CLUSTER"]["value"] == "1"
    assert env["LLM2CLIP_PIPELINE_RUN_ID"]["value"] == "run-1234"
    assert all("value" not in e for e in env.values() if e["name"].startswith(("AWS_", "MLFLOW_")))


def test_refuses_local_and_unmapped_uris():
    with pytest.raises(ValueError, match="not an s3:// URI.*do not share the KFP pod's disk"):
        build(uris={**uris(), "vision_model": "/tmp/outputs/vision_model"})
    with pytest.raises(ValueError, match="to_s3_uri"):
        build(uris={**uris(), "data": "minio://mlpipeline/data"})
    with pytest.raises(ValueError, match="needs URIs"):
        build(uris={"data": "s3://b/d"})
    with pytest.raises(ValueError, match="run as a TrainJob"):
        build(stage="evaluate")
    assert to_s3_uri("minio://mlpipeline/v2/artifacts/x") == "s3://mlpipeline/v2/artifacts/x"
    assert to_s3_uri("s3://b/k") == "s3://b/k"


def test_profile_round_trips_through_json():
    profile = make_profile()
    assert from_dict(ClusterProfile, json.loads(json.dumps(to_dict(profile)))) == profile


# ------------------------------------------------------------------------------- end to end


@pytest.fixture()
def s3(s3_bucket):
    """``(common section, uris, write_manifest)`` on a fresh moto bucket."""
    import boto3

    endpoint, bucket = s3_bucket
    common = {"s3_endpoint_url": endpoint}
    cfg, common_cfg = load_sections(STAGE, common, CONFIG)

    def write_manifest(**over):
        manifest = {"stage": STAGE, "format_version": 1, "config_hash": config_hash(common_cfg, cfg),
                    "training": {"steps": 7, "world_size": 4, "checkpoint": "step-7"},
                    "model": {"tower": "vit_scratch", "embed_dim": 256}, "files": {"a": "sha"}, **over}
        boto3.client("s3", endpoint_url=endpoint).put_object(
            Bucket=bucket, Key="vision_model/manifest.json", Body=json.dumps(manifest).encode())

    return common, uris(bucket), write_manifest


@pytest.fixture()
def fake_server():
    servers: list[FakeK8s] = []

    def start(scenario, **kwargs) -> FakeK8s:
        server = FakeK8s(scenario, **kwargs).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__()
        assert server.errors == [], server.errors


def launch(fake: FakeK8s, common: dict, job_uris: dict, sink: list, **kwargs):
    return run_trainjob(STAGE, common, CONFIG, job_uris, image="llm2clip:1-cu128", profile=make_profile(),
                        pipeline_run_id="run-1234", api_client=fake.api_client(), log_sink=sink.append, **kwargs)


def test_success_streams_logs_and_verifies_the_manifest(fake_server, s3):
    common, job_uris, write_manifest = s3
    pod = FakePod("job-node-0-0-a", ["rank 0: step 1 loss 2.1", "rank 0: step 2 loss 1.9"])
    fake = fake_server([Step(running(), [pod], wait_logs=(pod.name,)),
                        Step(complete(), [FakePod(pod.name, [], "Succeeded", uid=pod.uid)], action=write_manifest)])
    sink: list[str] = []
    handler = signal.getsignal(signal.SIGTERM)
    result = launch(fake, common, job_uris, sink)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert sink == [f"[{pod.name}] rank 0: step 1 loss 2.1", f"[{pod.name}] rank 0: step 2 loss 1.9"]
    assert result["trainjob"].startswith("l2c-train-vision-")
    assert (result["num_nodes"], result["nproc_per_node"], result["world_size"]) == (2, 2, 4)
    assert result["stage"] == STAGE and result["training.steps"] == 7 and result["model.tower"] == "vit_scratch"
    assert all(isinstance(v, (str, int, float, bool)) for v in result.values())
    [post] = fake.calls("POST")
    assert post.query["fieldValidation"] == ["Strict"]
    posted_args = post.body["spec"]["trainer"]["args"]
    assert posted_args[posted_args.index("--data") + 1] == job_uris["data"]
    selector = fake.calls("GET", "/pods")[0].query["labelSelector"][0]
    assert f"jobset.sigs.k8s.io/jobset-name={result['trainjob']}" in selector
    assert "batch.kubernetes.io/job-completion-index=0" in selector
    assert fake.calls("GET", "/log")[0].query["follow"][0].lower() == "true"  # the client sends "True"
    assert not fake.calls("DELETE")


def test_failure_raises_the_jobs_own_message(fake_server, s3):
    common, job_uris, _ = s3
    pod = FakePod("job-node-0-0-a", ["Traceback ...", "RuntimeError: CUDA out of memory"])
    fake = fake_server([Step(running(), [pod], wait_logs=(pod.name,)),
                        Step(failed("JobSetFailed", "jobset failed: node-0 exited with code 1 (backoffLimit)"))])
    sink: list[str] = []
    with pytest.raises(TrainJobFailed, match=r"failed \(JobSetFailed\): jobset failed: node-0 exited") as info:
        launch(fake, common, job_uris, sink)
    assert info.value.reason == "JobSetFailed"
    assert sink[-1].endswith("RuntimeError: CUDA out of memory")
    assert not fake.calls("DELETE")  # a failed job stays for kubectl describe


def test_node_lost_restarted_then_complete(fake_server, s3, caplog):
    common, job_uris, write_manifest = s3
    first = FakePod("job-node-0-0-a", ["step 1", "step 2 checkpoint saved to s3"])
    second = FakePod("job-node-0-0-b", ["resumed from step 2", "step 3"])
    fake = fake_server([
        Step(running(), [first], wait_logs=(first.name,)),
        Step({"jobsStatus": jobs_status(active=0, failed=1)}, []),  # a node lost: its job failed
        Step(running(failed=0), [second], wait_logs=(second.name,)),  # JobSet restarted the jobs
        Step(complete(), [FakePod(second.name, [], "Succeeded", uid=second.uid)], action=write_manifest),
    ])
    sink: list[str] = []
    with caplog.at_level(logging.INFO, logger="llm2clip.cluster"):
        result = launch(fake, common, job_uris, sink)
    assert result["world_size"] == 4
    assert [line.split("] ")[0] + "]" for line in sink] == [f"[{first.name}]"] * 2 + [f"[{second.name}]"] * 2
    assert "resumed from step 2" in sink[2]
    assert "node lost" in caplog.text and "failed=1" in caplog.text
    assert not fake.calls("DELETE")


def test_409_adopts_the_running_job(fake_server, s3):
    common, job_uris, write_manifest = s3
    fake = fake_server([Step(complete(), action=write_manifest)])
    existing = build(common=common, uris=job_uris)
    fake.seed(existing, running())
    result = launch(fake, common, job_uris, [])
    assert result["trainjob"] == existing["metadata"]["name"]
    assert len(fake.calls("POST")) == 1  # refused with 409, not retried
    assert fake.trainjobs[existing["metadata"]["name"]]["metadata"]["generation"] == 1
    assert not fake.calls("DELETE")


def test_409_with_another_spec_is_refused(fake_server, s3):
    common, job_uris, _ = s3
    fake = fake_server([])
    fake.seed(build(common=common, uris=job_uris, image="llm2clip:0-old"), running())
    with pytest.raises(TrainJobError, match="exists with a different spec"):
        launch(fake, common, job_uris, [])
    assert not fake.calls("DELETE")


def test_409_on_a_failed_job_recreates_it(fake_server, s3):
    common, job_uris, write_manifest = s3
    fake = fake_server([Step(running()), Step(complete(), action=write_manifest)])
    fake.seed(build(common=common, uris=job_uris), failed("JobSetFailed", "first attempt"), scenario_now=False)
    result = launch(fake, common, job_uris, [])
    assert result["config_hash"]
    assert [r.method for r in fake.requests if "/trainjobs" in r.path][:3] == ["POST", "GET", "DELETE"]
    assert len(fake.calls("POST")) == 2


def test_403_names_the_verb_and_the_role(fake_server, s3):
    common, job_uris, _ = s3
    fake = fake_server([], forbid={("create", "trainjobs")})
    with pytest.raises(TrainJobError) as info:
        launch(fake, common, job_uris, [])
    message = str(info.value)
    assert "'create' on trainjobs.trainer.kubeflow.org" in message
    assert "llm2clip-trainjob-launcher" in message and "manifests/base/rbac.yaml" in message
    assert "\n" not in message


def test_403_on_pod_logs_only_loses_the_logs(fake_server, s3):
    common, job_uris, write_manifest = s3
    steps = [Step(running(), [FakePod("p", ["x"])]), Step(running()), Step(complete(), action=write_manifest)]
    fake = fake_server(steps, forbid={("list", "pods")})
    sink: list[str] = []
    assert launch(fake, common, job_uris, sink)["world_size"] == 4
    assert sink == []


def test_404_trainer_not_installed(fake_server, s3):
    common, job_uris, _ = s3
    fake = fake_server([], crd_installed=False)
    with pytest.raises(TrainJobError, match=r"Trainer v2 is not installed \(no trainjobs.trainer.kubeflow.org"):
        launch(fake, common, job_uris, [])


def test_foreign_manifest_is_an_error_naming_the_stage(fake_server, s3):
    common, job_uris, write_manifest = s3
    fake = fake_server([Step(complete(), action=lambda: write_manifest(config_hash="0123456789abcdef"))])
    with pytest.raises(TrainJobError, match="train_vision: .*config_hash '0123456789abcdef'.*stale or foreign"):
        launch(fake, common, job_uris, [])


def test_timeout_deletes_the_job(fake_server, s3):
    common, job_uris, _ = s3
    fake = fake_server([Step(running())])
    with pytest.raises(TrainJobTimeout, match="did not finish within"):
        launch(fake, common, job_uris, [], timeout_s=0.3)
    [delete] = fake.calls("DELETE")
    assert delete.query.get("propagationPolicy") == ["Foreground"]
    assert not fake.trainjobs


_LAUNCHER = textwrap.dedent("""
    import json, logging, sys
    from kubernetes import client
    from llm2clip.cluster.profile import ClusterProfile
    from llm2clip.cluster.trainjob import run_trainjob
    from llm2clip.config import from_dict

    logging.basicConfig(level=logging.INFO)
    url, profile, uris = sys.argv[1], from_dict(ClusterProfile, json.loads(sys.argv[2])), json.loads(sys.argv[3])
    configuration = client.Configuration()
    configuration.host = url
    run_trainjob("train_vision", {}, json.loads(sys.argv[4]), uris, image="img", profile=profile,
                 pipeline_run_id="run-1234", api_client=client.ApiClient(configuration))
""")


def test_sigterm_while_waiting_deletes_the_job(fake_server):
    fake = fake_server([Step(running())])
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, fake.url, json.dumps(to_dict(make_profile())), json.dumps(uris()),
         json.dumps(CONFIG)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(fake.calls("GET", "")) < 3 or not fake.trainjobs:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the launcher never polled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "cancelled by SIGTERM" in err.decode()
    [delete] = fake.calls("DELETE")
    assert delete.query.get("propagationPolicy") == ["Foreground"]
    assert not fake.trainjobs


@pytest.mark.parametrize(("status", "body", "expected"), [
    (404, {"message": 'namespaces "llm2clip" not found', "details": {"name": "llm2clip", "kind": "namespaces"}},
     "namespace llm2clip does not exist"),
    (404, "404 page not found", "Kubeflow Trainer v2 is not installed"),
    (404, {"message": 'trainjobs.trainer.kubeflow.org "x" not found', "details": {"name": "x", "kind": "trainjobs"}},
     "TrainJob x not found"),
    (422, {"message": 'TrainJob "x" is invalid: spec.trainer.numNodes: Invalid value: 0'}, "refused the TrainJob"),
    (500, {"message": "etcdserver: request timed out"}, "HTTP 500 etcdserver"),
])
def test_api_errors_are_one_readable_line(status, body, expected):
    from kubernetes.client.exceptions import ApiException

    from llm2clip.cluster.k8s import RESOURCE, api_error

    err = ApiException(status=status, reason="x")
    err.body = body if isinstance(body, str) else json.dumps({"kind": "Status", **body})
    error = api_error(err, "create", RESOURCE, "llm2clip")
    assert expected in str(error) and "\n" not in str(error) and error.status == status


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_profiles_build_valid_trainjobs(name):
    from llm2clip.cluster.profile import TRAINING_STAGES, load_cluster_profile
    from llm2clip.stages import STAGES

    profile = load_cluster_profile(name)
    for stage in TRAINING_STAGES:
        spec = STAGES[stage]
        job_uris = {n: f"s3://b/{n}" for n in spec.inputs + spec.outputs}
        job = build_trainjob(stage=stage, common={}, config={}, uris=job_uris, image="img", profile=profile,
                             pipeline_run_id="r")
        crds.validate(job)
        assert job["spec"]["trainer"]["numNodes"] == profile.task(stage).num_nodes


def test_cpu_only_task_has_no_accelerator_or_shm_patch():
    profile = ClusterProfile(tasks={STAGE: TaskProfile(launcher="trainjob", cpu_request="2", memory_request="4Gi")})
    job = build(profile=profile)
    crds.validate(job)
    assert job["spec"]["trainer"]["resourcesPerNode"] == {"requests": {"cpu": "2", "memory": "4Gi"}}
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert set(pod["template"]["spec"]["template"]["spec"]) == {"serviceAccountName"}
    assert "activeDeadlineSeconds" not in job["spec"]
