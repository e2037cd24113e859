"""Cluster profiles: where each pipeline task runs (pods, GPUs, secrets, retries, TrainJobs).

A profile (``params/cluster/<name>.yaml``) is kept apart from params.yaml on purpose: it says
*where* a stage runs, never *what* it computes, so DVC never reads it and changing a CPU request
moves no stage hash and no KFP cache key. ``pipelines.llm2clip_pipeline`` applies it at compile
time (kfp + kfp-kubernetes); the TrainJob launcher reads the same typed object at run time.

The file has cluster-wide settings, ``defaults`` for every task, and ``stages.<stage>`` entries
that override the defaults key by key::

    namespace: llm2clip
    secrets:
      - {secret: llm2clip-s3, env: {AWS_ACCESS_KEY_ID: AWS_ACCESS_KEY_ID, ...}}
    defaults: {cpu_request: "2", memory_request: 8Gi, retries: 1, timeout_s: 7200}
    stages:
      train_vision: {launcher: trainjob, num_nodes: 2, accelerator_count: 8, ...}

Validation is the params loader's: an unknown key, a wrong type or a bad value is a
:class:`~llm2clip.config.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm2clip.config import ConfigError, from_dict, read_yaml_mapping, to_dict

TRAINING_STAGES = ("caption_contrastive", "train_vision")
"""Stages that may run as a multi-node Kubeflow Trainer TrainJob."""

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DURATION = re.compile(r"^[0-9]+(s|m|h)$")


def _check_quantity(value: str, where: str) -> None:
    if value and not _QUANTITY.match(value):
        raise ConfigError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")


@dataclass(frozen=True)
class Toleration:
    """A pod toleration (``kubectl explain pod.spec.tolerations``)."""

    key: str = ""
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""

    def to_k8s(self) -> dict[str, str]:
        return {k: v for k, v in to_dict(self).items() if v}


@dataclass(frozen=True)
class SecretEnv:
    """Environment variables taken from one Kubernetes Secret.

    Attributes:
        secret: The Secret's name (created by the platform team; the repo has templates only).
        env: Environment variable -> key in the Secret.
        optional: A missing Secret/key leaves the variable unset instead of failing the pod.
    """

    secret: str = ""
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False

    def __post_init__(self) -> None:
        if not self.secret or not self.env:
            raise ConfigError("secrets[]: each entry needs a secret name and at least one env mapping")


@dataclass(frozen=True)
class TaskProfile:
    """How one stage's task runs on Kubernetes.

    Attributes:
        cpu_request, cpu_limit, memory_request, memory_limit: Pod resources (quantities;
            empty = not set). For a TrainJob they are per node.
        accelerator_type: Extended resource of the accelerator, e.g. ``nvidia.com/gpu``.
        accelerator_count: Accelerators per pod (per node for a TrainJob); 0 = CPU only.
        node_selector: Node labels the pod must match.
        tolerations: Taints the pod tolerates (GPU pools are usually tainted).
        shm_size: Size of a memory-backed ``/dev/shm`` (DataLoader workers, NCCL); empty = none.
        timeout_s: Deadline of the pod (``activeDeadlineSeconds``); 0 = none.
        retries: Times KFP retries a failed task.
        backoff_duration, backoff_factor, backoff_max_duration: Retry backoff (``60s``, x2,
            at most ``3600s``).
        launcher: ``local``: the stage runs inside the task's pod (``nproc_per_node`` processes
            under torchrun). ``trainjob``: the task creates a Kubeflow Trainer TrainJob of
            ``num_nodes`` nodes and waits for it (training stages only).
        num_nodes: Nodes of the TrainJob (``launcher: trainjob``).
        shard_groups: Pods the stage fans out over (prepare_data, embed_captions): a KFP
            ``ParallelFor`` of that many group tasks, each a pod of this profile, then a small
            merge task (:mod:`llm2clip.data.parts`). 1 = one task. The output is the same
            either way, so the count is placement, not a hyperparameter.
    """

    cpu_request: str = "1"
    cpu_limit: str = ""
    memory_request: str = "2Gi"
    memory_limit: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    shm_size: str = ""
    timeout_s: int = 0
    retries: int = 0
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "3600s"
    launcher: Literal["local", "trainjob"] = "local"
    num_nodes: int = 1
    shard_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size"):
            _check_quantity(getattr(self, name), name)
        for name in ("backoff_duration", "backoff_max_duration"):
            if not _DURATION.match(getattr(self, name)):
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a duration like 60s, 5m, 1h")
        if self.accelerator_count < 0 or self.timeout_s < 0 or self.retries < 0 or self.num_nodes < 1:
            raise ConfigError("accelerator_count, timeout_s and retries must be >= 0, num_nodes >= 1")
        if self.shard_groups < 1:
            raise ConfigError(f"shard_groups: {self.shard_groups}; it must be >= 1 (1 = no fan-out)")
        if self.accelerator_count and not self.accelerator_type:
            raise ConfigError("accelerator_count > 0 needs accelerator_type (e.g. nvidia.com/gpu)")
        if self.num_nodes > 1 and self.launcher != "trainjob":
            raise ConfigError(f"num_nodes: {self.num_nodes} nodes need launcher: trainjob")

    @property
    def gpu(self) -> bool:
        """True when the pods (or TrainJob nodes) get accelerators: they run the GPU image."""
        return self.accelerator_count > 0

    def resources(self) -> dict[str, dict[str, str]]:
        """Kubernetes ``resources`` (requests/limits) with the accelerator as a limit."""
        requests = {k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v}
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        if self.accelerator_count:
            limits[self.accelerator_type] = str(self.accelerator_count)
            requests[self.accelerator_type] = str(self.accelerator_count)
        return {"requests": requests, "limits": limits}


@dataclass(frozen=True)
class ClusterProfile:
    """A whole cluster profile: cluster-wide settings plus one resolved task profile per stage.

    Attributes:
        name: The profile's name (its file stem); shown in the compiled pipeline's description.
        namespace: Namespace of the pipeline's pods and TrainJobs.
        service_account: Service account of TrainJob pods (the manifests' ``llm2clip-pipeline``).
        image_repository: Image repository; tags are ``<version>-<code digest>-<flavor>``.
        image_pull_policy: ``IfNotPresent`` (tags are immutable: they name the code) or ``Always``.
        trainjob_runtime: Name of the (namespaced) TrainingRuntime TrainJobs refer to.
        trainjob_poll_s: Seconds between TrainJob status polls of the launcher.
        run_as_user: UID of every container (the image's non-root user).
        secrets: Secrets mapped into every task's (and TrainJob node's) environment.
        tasks: ``{stage: TaskProfile}``, defaults merged with the stage's own entry.
    """

    name: str = "cpu"
    namespace: str = "llm2clip"
    service_account: str = "llm2clip-pipeline"
    image_repository: str = "ghcr.io/llm2clip/llm2clip"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    trainjob_runtime: str = "llm2clip-torch"
    trainjob_poll_s: float = 10.0
    run_as_user: int = 1000
    secrets: tuple[SecretEnv, ...] = ()
    tasks: dict[str, TaskProfile] = field(default_factory=dict)

    def task(self, stage: str) -> TaskProfile:
        """The profile of ``stage`` (the defaults when the file has no entry for it)."""
        return self.tasks.get(stage, TaskProfile())


_DEFAULT_PROFILES = Path(__file__).resolve().parents[2] / "params" / "cluster"


def load_cluster_profile(path: str | Path) -> ClusterProfile:
    """Read and validate ``params/cluster/<name>.yaml`` (a bare name looks there).

    Raises:
        ConfigError: Missing file, unknown key, wrong type or value, a stage that does not exist,
            or a TrainJob asked of a stage that cannot run as one.
    """
    from llm2clip.stages import STAGES

    path = Path(path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = _DEFAULT_PROFILES / f"{path}.yaml"
    raw = read_yaml_mapping(path, "cluster profile", "a mapping")
    if "tasks" in raw:
        raise ConfigError(f"{path}: set tasks under 'defaults' and 'stages.<stage>', not 'tasks'")
    defaults, stages = raw.pop("defaults", {}) or {}, raw.pop("stages", {}) or {}
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"{path}: stages.{unknown[0]} is no stage (stages: {', '.join(STAGES)})")
    tasks: dict[str, Any] = {}
    for stage in STAGES:
        task = from_dict(TaskProfile, {**defaults, **(stages.get(stage) or {})}, f"stages.{stage}")
        if task.launcher == "trainjob" and stage not in TRAINING_STAGES:
            raise ConfigError(f"stages.{stage}.launcher: only {' and '.join(TRAINING_STAGES)} run as a TrainJob")
        if task.shard_groups > 1 and not STAGES[stage].fans_out:
            fanning = [name for name, spec in STAGES.items() if spec.fans_out]
            raise ConfigError(f"stages.{stage}.shard_groups: only {' and '.join(fanning)} fan out across pods")
        tasks[stage] = task
    return dataclasses.replace(from_dict(ClusterProfile, {"name": path.stem, **raw}), tasks=tasks)


def check_fit(profile: ClusterProfile, params: Any) -> None:
    """Refuse params that a profile's GPU tasks cannot run: one process per GPU.

    Args:
        profile: The cluster profile.
        params: The validated :class:`~llm2clip.config.Params`.

    Raises:
        ConfigError: A training stage on GPUs whose ``nproc_per_node`` differs from its GPUs per
            node (processes would share a GPU or leave some idle).
    """
    for stage in TRAINING_STAGES:
        task, nproc = profile.task(stage), params.section(stage).nproc_per_node
        if task.gpu and nproc != task.accelerator_count:
            raise ConfigError(
                f"{stage}.nproc_per_node is {nproc}, but cluster profile {profile.name} gives each node "
                f"{task.accelerator_count} {task.accelerator_type}: run one process per GPU "
                f"(--set {stage}.nproc_per_node={task.accelerator_count})")
