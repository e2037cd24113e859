"""Cluster profiles applied at compile time: every task's pod settings, parsed strictly.

The compiled YAML has two documents: the ``PipelineSpec`` and the ``PlatformSpec`` whose
``kubernetes`` executors hold the kfp-kubernetes settings. Both are parsed into their protobuf
messages with unknown fields refused, then each task's settings are compared with its profile.
"""

import json
import subprocess
import sys

import pytest
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_helpers import REPO, pipeline_tasks

from llm2clip.cluster.profile import TRAINING_STAGES, ClusterProfile, load_cluster_profile
from llm2clip.cluster.task import PIPELINE_RUN_ENV, PROFILE_ENV
from llm2clip.config import ConfigError, from_dict
from llm2clip.stages import STAGES
from pipelines.llm2clip_pipeline import RUN_ID_FIELD, launcher_pod, merge_pod

PROFILES = ("cpu", "gpu")


# the eval-set ParallelFor runs these tasks with their stage's component, placed like that stage
EVAL_VARIANTS = {"prepare_eval": "prepare_data", "embed_eval": "embed_captions"}
# a stage with shard_groups > 1 (the gpu profile): a ParallelFor of group tasks placed like the
# stage, and a merge task under the stage's name in a CPU pod of the stage's size
GROUPS = {"prepare_data_group": "prepare_data", "embed_captions_group": "embed_captions"}
LOOPED = {**EVAL_VARIANTS, **GROUPS}


def expected_pod(cluster: ClusterProfile, name: str):
    """The pod a task (a stage, an eval variant or a group task) must have under ``cluster``."""
    settings = cluster.task(LOOPED.get(name, name))
    if settings.launcher == "trainjob":
        return launcher_pod(settings)
    return merge_pod(settings) if name in STAGES and settings.shard_groups > 1 else settings


def present(profile: str) -> list[str]:
    """The tasks a profile's pipeline has: the stages, the eval variants and its group tasks."""
    cluster = load_cluster_profile(profile)
    return [*STAGES, *EVAL_VARIANTS, *(g for g, stage in GROUPS.items() if cluster.task(stage).shard_groups > 1)]


def all_tasks(spec: dict) -> dict[str, dict]:
    """Root tasks and the tasks of sub-DAGs (the eval-set ParallelFor), by display name."""
    tasks = dict(pipeline_tasks(spec))
    for component in spec["components"].values():
        tasks |= {t["taskInfo"]["name"]: t for t in component.get("dag", {}).get("tasks", {}).values()}
    return tasks


def task_settings(spec: dict, platform: dict, stage: str) -> tuple[dict, dict, dict]:
    """``(task, container, kubernetes executor config)`` of ``stage`` (or an eval variant) in a compiled pipeline."""
    task = all_tasks(spec)[stage]
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][executor]["container"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
    return task, container, k8s


@pytest.mark.parametrize("profile", PROFILES)
def test_compiled_yaml_parses_strictly(compiled, profile):
    spec, platform = compiled[profile]
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise ParseError
    platform_spec = json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    executors = platform_spec.platforms["kubernetes"].deployment_spec.executors
    assert len(executors) == len(present(profile))
    for name, struct in executors.items():
        config = json_format.ParseDict(json_format.MessageToDict(struct), k8s_pb2.KubernetesExecutorConfig())
        assert config.image_pull_policy == "IfNotPresent", name


@pytest.mark.parametrize(("profile", "stage"), [(p, s) for p in PROFILES for s in present(p)])
def test_each_task_carries_its_profile(compiled, profile, stage):
    spec, platform = compiled[profile]
    cluster = load_cluster_profile(profile)
    pod = expected_pod(cluster, stage)
    task, container, k8s = task_settings(spec, platform, stage)

    resources = container["resources"]
    assert resources["resourceCpuRequest"] == pod.cpu_request
    assert resources["resourceMemoryRequest"] == pod.memory_request
    assert resources.get("resourceCpuLimit", "") == pod.cpu_limit
    assert resources.get("resourceMemoryLimit", "") == pod.memory_limit
    if pod.accelerator_count:
        assert resources["accelerator"]["resourceType"] == pod.accelerator_type
        assert resources["accelerator"]["resourceCount"] == str(pod.accelerator_count)
    else:
        assert "accelerator" not in resources
    image = "gpu_image" if pod.gpu else "image"
    assert container["image"] == f"{{{{$.inputs.parameters['pipelinechannel--{image}']}}}}"
    channel = f"pipelinechannel--{image}"
    if stage in LOOPED:  # inside a ParallelFor: the loop passes the pipeline's parameter in
        assert task["inputs"]["parameters"][channel] == {"componentInputParameter": channel}
        loops = [t for t in pipeline_tasks(spec).values() if channel in t["inputs"].get("parameters", {})
                 and "parameterIterator" in t
                 and task in spec["components"][t["componentRef"]["name"]]["dag"]["tasks"].values()]
        assert [loop["inputs"]["parameters"][channel] for loop in loops] == [{"componentInputParameter": image}]
    else:
        assert task["inputs"]["parameters"][channel] == {"componentInputParameter": image}

    assert k8s.get("nodeSelector", {}).get("labels", {}) == pod.node_selector
    assert [{k: v for k, v in t.items() if k != "tolerationSeconds"} for t in k8s.get("tolerations", [])] == \
        [t.to_k8s() for t in pod.tolerations]
    shm = [m for m in k8s.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
    assert shm == ([{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                     "sizeLimit": pod.shm_size}] if pod.shm_size else [])
    assert int(k8s.get("activeDeadlineSeconds", 0)) == pod.timeout_s
    retry = task.get("retryPolicy", {})
    assert retry.get("maxRetryCount", 0) == pod.retries
    if pod.retries:
        assert retry["backoffDuration"] == pod.backoff_duration
        assert retry["backoffMaxDuration"] == pod.backoff_max_duration
    assert k8s["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
    secrets = {(s["secretName"], e["envVar"], e["secretKey"], s.get("optional", False))
               for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
    assert secrets == {(s.secret, env, key, s.optional) for s in cluster.secrets for env, key in s.env.items()}
    assert {env for _, env, _, _ in secrets} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                                 "MLFLOW_TRACKING_URI"}
    assert k8s["fieldPathAsEnv"] == [{"name": PIPELINE_RUN_ENV, "fieldPath": RUN_ID_FIELD}]


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_gpu_training_tasks_launch_trainjobs(compiled, stage):
    """The gpu profile's training tasks are small launcher pods that carry the whole profile and
    pass num_nodes and the GPU image to the component (both enter the cache key)."""
    spec, platform = compiled["gpu"]
    task, container, _ = task_settings(spec, platform, stage)
    cluster = load_cluster_profile("gpu")
    params = task["inputs"]["parameters"]
    assert params["num_nodes"] == {"runtimeValue": {"constant": float(cluster.task(stage).num_nodes)}}
    assert params["trainjob_image"] == {"componentInputParameter": "gpu_image"}
    (env,) = [e for e in container["env"] if e["name"] == PROFILE_ENV]
    assert from_dict(ClusterProfile, json.loads(env["value"])) == cluster
    assert cluster.task("train_vision").num_nodes == 2 and cluster.task("train_vision").accelerator_count == 8


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_cpu_training_tasks_run_in_their_pod(compiled, stage):
    spec, platform = compiled["cpu"]
    task, container, _ = task_settings(spec, platform, stage)
    assert task["inputs"]["parameters"]["trainjob_image"] == {"runtimeValue": {"constant": ""}}
    assert not [e for e in container.get("env", []) if e["name"] == PROFILE_ENV]


def test_only_gpu_tasks_use_the_gpu_image(compiled):
    spec, platform = compiled["gpu"]
    gpu_tasks = {name for name in present("gpu") if "gpu_image" in task_settings(spec, platform, name)[1]["image"]}
    # training runs on GPU nodes of its TrainJob; embed_captions' merge loads no model (a CPU pod)
    assert gpu_tasks == {"embed_captions_group", "embed_eval", "evaluate"}
    spec, platform = compiled["cpu"]
    assert not {stage for stage in STAGES if "gpu_image" in task_settings(spec, platform, stage)[1]["image"]}


@pytest.mark.parametrize("text, message", [
    ("defaults: {cpu_requests: '1'}", "unknown key stages.prepare_data.cpu_requests"),
    ("defaults: {memory_request: lots}", "not a Kubernetes quantity"),
    ("stages: {train_vision: {num_nodes: 2}}", "need launcher: trainjob"),
    ("stages: {evaluate: {launcher: trainjob}}", "only caption_contrastive and train_vision"),
    ("stages: {train: {cpu_request: '1'}}", "stages.train is no stage"),
    ("stages: {embed_captions: {accelerator_count: 1}}", "needs accelerator_type"),
    ("secrets: [{secret: s3}]", "at least one env mapping"),
    ("defaults: {backoff_duration: soon}", "not a duration"),
])
def test_bad_profiles_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_cluster_profile(path)


def test_compile_cli_refuses_a_missing_profile_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.compile", "--cluster", "nope",
                           "--output", str(tmp_path / "p.yaml")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "cluster profile not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_gpu_training_runs_one_process_per_gpu():
    """submit refuses (exit 2, nothing sent) params whose training processes do not match the GPUs."""
    from llm2clip.cluster.profile import check_fit
    from llm2clip.config import load_params

    gpu, cpu = load_cluster_profile("gpu"), load_cluster_profile("cpu")
    check_fit(gpu, load_params(REPO / "params" / "paper-openai-l14-336.yaml"))  # 8 processes on 8 GPUs per node
    check_fit(cpu, load_params(REPO / "params.yaml"))  # CPU tasks: any process count
    with pytest.raises(ConfigError, match=r"train_vision.nproc_per_node is 2, .*--set train_vision.nproc_per_node=8"):
        check_fit(gpu, load_params(REPO / "params" / "paper-openai-l14-336.yaml", ["train_vision.nproc_per_node=2"]))
