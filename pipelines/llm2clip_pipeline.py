"""The llm2clip pipeline: the stages of dvc.yaml, in the same order, as Kubeflow tasks.

Each task runs ``components/<stage>/component.py``, which calls the same
``llm2clip.stages.<stage>.run`` as ``dvc repro``. The pipeline takes one ``dict`` parameter per
params.yaml section and hands each task ``common`` plus its own section only: the same params
DVC hashes for the stage. Nothing here reads the environment: ``pipelines.submit`` /
``pipelines.local`` validate params.yaml and pass the sections in.

Where each task runs comes from a cluster profile (``params/cluster/<name>.yaml``), applied at
compile time with kfp + kfp-kubernetes: resources, accelerator, node selector, tolerations, a
memory-backed ``/dev/shm``, timeout, retries with backoff, pull policy, a non-root security
context, Secrets as env vars, and for training stages with ``launcher: trainjob`` a small
launcher pod that creates a Kubeflow Trainer TrainJob (:mod:`llm2clip.cluster.trainjob`).

Caching (KFP's key is a hash of a task's input parameter values, its input artifacts' ids, its
command/args and image; not its env or pod settings):
- data: an upstream task that reran produces new artifacts, so every consumer's key changes;
- the stage section and ``common``: input parameters (``common.data_revision``, the revision of
  the DVC-tracked data, included: another revision reruns every task; a branch name that moved
  does not: pass a commit, see :func:`data_revision_override`);
- code: the image tag names the source digest (``components.image_tag``), and each task's image
  is a pipeline parameter, so new code is a new key; a new image is a new key too;
- never otherwise: the run id is not a parameter (the pod's ``pipeline/runid`` label reaches the
  stage as ``$LLM2CLIP_PIPELINE_RUN_ID`` through the downward API), nor are the cluster
  profile's resources (env/pod settings). A TrainJob launcher takes its stage's input artifacts,
  so new data always reruns it; ``num_nodes`` is a parameter because it sets the world size.
"""

# No `from __future__ import annotations`: KFP reads the parameter types at decoration time.
import dataclasses
import json
from typing import Any

from kfp import dsl, kubernetes

from components import component, fanout_components, image_tag
from llm2clip.cluster.profile import TRAINING_STAGES, ClusterProfile, TaskProfile, load_cluster_profile
from llm2clip.cluster.task import PIPELINE_RUN_ENV, PROFILE_ENV
from llm2clip.config import Params, eval_set_sections, to_dict

PIPELINE_NAME = "llm2clip"
DEFAULT_PROFILE = "cpu"
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
"""The KFP backend labels every pod of a run with its id (v2 engine, backend >= 2.1)."""
SHM_VOLUME = "dshm"


def launcher_pod(task: TaskProfile) -> TaskProfile:
    """The pod of a TrainJob launcher task: small, CPU, with the stage's timeout and retries."""
    return TaskProfile(cpu_request="250m", cpu_limit="1", memory_request="512Mi", memory_limit="1Gi",
                       timeout_s=task.timeout_s, retries=task.retries, backoff_duration=task.backoff_duration,
                       backoff_factor=task.backoff_factor, backoff_max_duration=task.backoff_max_duration)


def apply_profile(task: dsl.PipelineTask, pod: TaskProfile, profile: ClusterProfile) -> None:
    """Pod settings of one task (kfp + kfp-kubernetes); none of them enters the cache key."""
    if pod.cpu_request:
        task.set_cpu_request(pod.cpu_request)
    if pod.cpu_limit:
        task.set_cpu_limit(pod.cpu_limit)
    if pod.memory_request:
        task.set_memory_request(pod.memory_request)
    if pod.memory_limit:
        task.set_memory_limit(pod.memory_limit)
    if pod.accelerator_count:
        task.set_accelerator_type(pod.accelerator_type).set_accelerator_limit(pod.accelerator_count)
    for key, value in sorted(pod.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    for toleration in pod.tolerations:
        kubernetes.add_toleration(task, key=toleration.key or None, operator=toleration.operator,
                                  value=toleration.value or None, effect=toleration.effect or None)
    if pod.shm_size:
        kubernetes.empty_dir_mount(task, SHM_VOLUME, "/dev/shm", medium="Memory",  # nosec B108  # an emptyDir mount
                                   size_limit=pod.shm_size)
    if pod.timeout_s:
        kubernetes.set_timeout(task, pod.timeout_s)
    if pod.retries:
        task.set_retry(pod.retries, pod.backoff_duration, pod.backoff_factor, pod.backoff_max_duration)
    kubernetes.set_image_pull_policy(task, profile.image_pull_policy)
    kubernetes.set_security_context(task, run_as_user=profile.run_as_user, run_as_group=profile.run_as_user,
                                    run_as_non_root=True)
    for secret in profile.secrets:
        kubernetes.use_secret_as_env(task, secret.secret, dict(secret.env), optional=secret.optional)
    kubernetes.use_field_path_as_env(task, PIPELINE_RUN_ENV, RUN_ID_FIELD)


def _stage(profile: ClusterProfile, stage: str, sections: dict[str, Any], images: dict[str, Any],
           display_name: str = "", **inputs: Any) -> dsl.PipelineTask:
    """One task of ``stage``: its component under the stage's name (or ``display_name``), placed by the profile."""
    settings = profile.task(stage)
    trainjob = settings.launcher == "trainjob"
    extra: dict[str, Any] = {}
    if stage in TRAINING_STAGES:
        extra = {"num_nodes": settings.num_nodes,
                 "trainjob_image": (images["gpu"] if settings.gpu else images["cpu"]) if trainjob else ""}
    task = component(stage)(common=sections["common"], config=sections[stage], **inputs, **extra)
    task.set_display_name(display_name or stage)
    pod = launcher_pod(settings) if trainjob else settings
    apply_profile(task, pod, profile)
    task.set_container_image(images["gpu"] if pod.gpu else images["cpu"])
    if trainjob:
        task.set_env_variable(PROFILE_ENV, json.dumps(to_dict(profile), sort_keys=True, separators=(",", ":")))
    return task


def _placed(task: dsl.PipelineTask, pod: TaskProfile, profile: ClusterProfile, images: dict[str, Any],
            display_name: str) -> dsl.PipelineTask:
    task.set_display_name(display_name)
    apply_profile(task, pod, profile)
    task.set_container_image(images["gpu"] if pod.gpu else images["cpu"])
    return task


def merge_pod(task: TaskProfile) -> TaskProfile:
    """The pod of a fan-out's merge: the stage's CPU and memory, no accelerator (it loads no model)."""
    return dataclasses.replace(task, accelerator_type="", accelerator_count=0, node_selector={}, tolerations=(),
                               shard_groups=1)


def group_loop(stage: str) -> str:
    """Name of a stage's fan-out ParallelFor; its tasks show as ``<stage>_group`` and ``<stage>``."""
    return f"{stage.replace('_', '-')}-groups"


def _data_stage(profile: ClusterProfile, stage: str, sections: dict[str, Any], images: dict[str, Any],
                **inputs: Any) -> dsl.PipelineTask:
    """A stage that can fan out: one task, or with ``shard_groups: N`` in its cluster profile a
    ParallelFor of N group tasks (each a pod of the stage's profile, retried alone) and a merge
    task shown under the stage's name, whose outputs are the stage's."""
    settings = profile.task(stage)
    if settings.shard_groups <= 1:
        return _stage(profile, stage, sections, images, **inputs)
    group, merge = fanout_components(stage)
    common, config, n = sections["common"], sections[stage], settings.shard_groups
    with dsl.ParallelFor(list(range(n)), name=group_loop(stage), parallelism=n) as part:
        made = _placed(group(common=common, config=config, part=part, parts=n, **inputs), settings, profile,
                       images, f"{stage}_group")
    (output,) = made.outputs.keys()
    merged = merge(common=common, config=config, parts=dsl.Collected(made.outputs[output]), **inputs)
    return _placed(merged, merge_pod(settings), profile, images, stage)


EVAL_LOOP = "eval-sets"
"""Name of the ParallelFor over the evaluation sets; its tasks show as ``prepare_eval`` / ``embed_eval``."""


def _eval_sets(profile: ClusterProfile, eval_data: Any, images: dict[str, Any], encoder: Any) -> tuple[Any, Any]:
    """Prepare and embed every evaluation set, one ParallelFor iteration each (the same two
    components as the pipeline's data, with the sections ``eval_set_sections`` derived for the
    set); returns the collected ``(data, embeddings)`` outputs that evaluate takes."""
    with dsl.ParallelFor(eval_data, name=EVAL_LOOP) as item:
        sections = {"common": item.common, "prepare_data": item.prepare_data, "embed_captions": item.embed_captions}
        data = _stage(profile, "prepare_data", sections, images, display_name="prepare_eval").outputs["data"]
        embeddings = _stage(profile, "embed_captions", sections, images, display_name="embed_eval", data=data,
                            caption_encoder=encoder).outputs["embeddings"]
    return dsl.Collected(data), dsl.Collected(embeddings)


def _after_data(profile: ClusterProfile, sections: dict[str, Any], images: dict[str, Any], eval_data: Any,
                data: Any) -> None:
    """Every task after the prepared data: tuning, embedding, training, the eval sets, evaluate, register."""
    encoder = _stage(profile, "caption_contrastive", sections, images, data=data).outputs["caption_encoder"]
    embeddings = _data_stage(profile, "embed_captions", sections, images, data=data,
                             caption_encoder=encoder).outputs["embeddings"]
    model = _stage(profile, "train_vision", sections, images, data=data,
                   embeddings=embeddings).outputs["vision_model"]
    eval_sets, eval_embeddings = _eval_sets(profile, eval_data, images, encoder)
    report = _stage(profile, "evaluate", sections, images, data=data, embeddings=embeddings,
                    vision_model=model, eval_data=eval_sets,
                    eval_embeddings=eval_embeddings).outputs["report"]
    _stage(profile, "register", sections, images, vision_model=model, caption_encoder=encoder, report=report)


def _imported_data(profile: ClusterProfile, common: Any, repo: Any, path: Any, images: dict[str, Any]) -> Any:
    """The task that copies a DVC-versioned prepared dataset (at ``common.data_revision``), shown
    as prepare_data and placed like it."""
    from components.prepare_data.imported import prepare_data_import

    task = prepare_data_import(common=common, repo=repo, path=path)
    return _placed(task, merge_pod(profile.task("prepare_data")), profile, images, "prepare_data").outputs["data"]


def build_pipeline(profile: ClusterProfile | None = None, prepared: bool = False):
    """The pipeline placed by ``profile`` (default ``params/cluster/cpu.yaml``).

    With ``prepared``, the pipeline starts from a prepared dataset that a git + DVC repository
    versions (parameters ``prepared_repo``, ``prepared_path``; read at ``common.data_revision``)
    instead of preparing one: it has no ``prepare_data`` parameter, and its first task copies and
    checks that dataset (:func:`llm2clip.stages.prepare_data.run_import`).
    """
    profile = profile or load_cluster_profile(DEFAULT_PROFILE)
    defaults = {flavor: image_tag(flavor, profile.image_repository) for flavor in ("cpu", "gpu")}
    description = f"LLM2CLIP, cluster profile {profile.name}" + (", from a DVC-versioned prepared dataset"
                                                                  if prepared else "")

    if prepared:
        @dsl.pipeline(name=PIPELINE_NAME, description=description)
        def llm2clip_from_prepared(
            common: dict,
            caption_contrastive: dict,
            embed_captions: dict,
            train_vision: dict,
            evaluate: dict,
            register: dict,
            prepared_repo: str,
            prepared_path: str = "data/prepared",
            eval_data: list = [],  # noqa: B006 (KFP reads the default from the signature; never mutated)
            image: str = defaults["cpu"],
            gpu_image: str = defaults["gpu"],
        ) -> None:
            """LLM2CLIP from a prepared dataset versioned by DVC.

            Args:
                common: The ``common`` params section; ``data_revision`` names the revision read.
                caption_contrastive: The ``caption_contrastive`` section.
                embed_captions: The ``embed_captions`` section.
                train_vision: The ``train_vision`` section.
                evaluate: The ``evaluate`` section.
                register: The ``register`` section.
                prepared_repo: The git + DVC repository (URL or path) that versions the dataset.
                prepared_path: Its folder in the repository (a prepare_data output).
                eval_data: One item per evaluation set (see the main pipeline).
                image: Image of CPU tasks.
                gpu_image: Image of GPU tasks.
            """
            sections = {"common": common, "caption_contrastive": caption_contrastive,
                        "embed_captions": embed_captions, "train_vision": train_vision, "evaluate": evaluate,
                        "register": register}
            images = {"cpu": image, "gpu": gpu_image}
            data = _imported_data(profile, common, prepared_repo, prepared_path, images)
            _after_data(profile, sections, images, eval_data, data)

        return llm2clip_from_prepared

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def llm2clip_pipeline(
        common: dict,
        prepare_data: dict,
        caption_contrastive: dict,
        embed_captions: dict,
        train_vision: dict,
        evaluate: dict,
        register: dict,
        eval_data: list = [],  # noqa: B006 (KFP reads the default from the signature; never mutated)
        image: str = defaults["cpu"],
        gpu_image: str = defaults["gpu"],
    ) -> None:
        """LLM2CLIP: train a CLIP vision encoder against a caption-tuned LLM text encoder.

        Args:
            common: The ``common`` params section (seed, MLflow experiment, caption fields, the
                data revision that ``dvc`` sources read at and every task records).
            prepare_data: The ``prepare_data`` params section (sources, validation, sharding).
            caption_contrastive: The ``caption_contrastive`` section (base LLM, LoRA, steps).
            embed_captions: The ``embed_captions`` section (dtype, token budget, workers).
            train_vision: The ``train_vision`` section (tower, adapter, DeepSpeed, steps).
            evaluate: The ``evaluate`` section (eval sets, primary metric, quality gate).
            register: The ``register`` section (promotion margin, gate requirement).
            eval_data: One item per evaluation set of the ``eval_data`` section:
                ``{name, common, prepare_data, embed_captions}``, the sections that prepare and
                embed it (``pipelines.llm2clip_pipeline.pipeline_arguments`` derives them).
            image: Image of CPU tasks (default: this source tree's ``-cpu`` tag).
            gpu_image: Image of tasks and TrainJob nodes with accelerators (``-cu128`` tag).
        """
        sections = {"common": common, "prepare_data": prepare_data, "caption_contrastive": caption_contrastive,
                    "embed_captions": embed_captions, "train_vision": train_vision, "evaluate": evaluate,
                    "register": register}
        images = {"cpu": image, "gpu": gpu_image}
        data = _data_stage(profile, "prepare_data", sections, images).outputs["data"]
        _after_data(profile, sections, images, eval_data, data)

    return llm2clip_pipeline


llm2clip_pipeline = build_pipeline()
"""The pipeline with the default (CPU) cluster profile."""

SECTIONS = ("common", "prepare_data", "caption_contrastive", "embed_captions", "train_vision", "evaluate",
            "register")
"""The pipeline parameters that are params.yaml sections (the others are the images)."""


def pipeline_arguments(params: Params, images: dict[str, str] | None = None,
                       prepared: tuple[str, str] | None = None) -> dict[str, Any]:
    """The pipeline's arguments: one plain JSON-able dict per section, plus image overrides.

    Args:
        params: Validated params.
        images: Optional ``{"image": tag, "gpu_image": tag}``; absent keys keep the defaults.
        prepared: ``(repo, path)`` of a DVC-versioned prepared dataset: the arguments of
            ``build_pipeline(prepared=True)`` (no ``prepare_data`` section).

    Raises:
        RuntimeError: The pipeline takes a section that ``Params`` does not have.
    """
    sections = params.to_dict()
    missing = sorted(set(SECTIONS) - set(sections))
    if missing:
        raise RuntimeError(f"the pipeline takes params sections that Params lacks: {missing}")
    arguments: dict[str, Any] = {name: _without_nulls(sections[name]) for name in SECTIONS}
    arguments["eval_data"] = eval_data_items(params)
    unknown = sorted(set(images or {}) - {"image", "gpu_image"})
    if unknown:
        raise RuntimeError(f"unknown image parameters {unknown}: image, gpu_image")
    if prepared:
        del arguments["prepare_data"]
        arguments |= {"prepared_repo": prepared[0], "prepared_path": prepared[1]}
    return arguments | {k: v for k, v in (images or {}).items() if v}


def data_revision_override(revision: str | None) -> list[str]:
    """The ``--set`` override of ``--data-revision REV`` (``pipelines.submit`` / ``pipelines.local``):
    ``common.data_revision``, quoted so that a revision of digits stays a string; none without one.

    The revision is the git revision (commit, tag, branch) of the DVC-tracked data: every ``dvc``
    source without its own ``rev`` reads at it, every stage's MLflow run records it
    (``llm2clip.data_revision``) and so does the registered model version (``data_revision``).
    KFP's cache key holds the name as given: a later run naming a branch that has moved reuses
    the cached tasks, so pin a commit (``git rev-parse``) or pass ``--no-cache``.
    """
    return [f"common.data_revision={json.dumps(revision)}"] if revision else []


def prepared_dataset(repo: str | None, path: str, params: Params) -> tuple[str, str] | None:
    """``(repo, path)`` of ``--prepared-repo``/``--prepared-path`` (None without a repo).

    Raises:
        ConfigError: a repository but no ``common.data_revision`` to read it at.
    """
    if not repo:
        return None
    if not params.common.data_revision:
        from llm2clip.config import ConfigError

        raise ConfigError("--prepared-repo needs --data-revision: the revision of the prepared dataset to start from")
    return repo, path


def eval_data_items(params: Params) -> list[dict[str, Any]]:
    """The ``eval_data`` pipeline argument: per evaluation set, the sections that prepare and embed
    it (the same derivation as ``llm2clip prepare_data --eval-set NAME``)."""
    items = []
    for name, spec in params.eval_data.items():
        common, prepare, embed = eval_set_sections(name, spec, params.common, params.embed_captions)
        items.append({"name": name, "common": _without_nulls(to_dict(common)),
                      "prepare_data": _without_nulls(to_dict(prepare)),
                      "embed_captions": _without_nulls(to_dict(embed))})
    return items


def _without_nulls(value: Any) -> Any:
    """KFP parameters cannot carry null; an absent key means the same (every optional field of
    the params schema defaults to None), and the task re-validates the section."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
