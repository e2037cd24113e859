"""The llm2clip pipeline: the stages of dvc.yaml, in the same order, as Kubeflow tasks.

Each task runs ``components/<stage>/component.py``, which calls the same
``llm2clip.stages.<stage>.run`` as ``dvc repro``. The pipeline takes one ``dict`` parameter per
params.yaml section and hands each task ``common`` plus its own section only: the same params
DVC hashes for the stage, so editing one stage's section does not touch the others' inputs.
Nothing here reads the environment or a file:
``pipelines.submit`` / ``pipelines.local`` validate params.yaml and pass the sections in.

Every task also gets ``pipeline_run_id`` = the KFP run id (``kfp.local``: a random 8-digit id),
tagged on its MLflow run for lineage. The backend resolves that placeholder *before* it computes
the cache key, so caching (left on) reuses a task within a run (retries) but not across runs.
"""

# No `from __future__ import annotations`: KFP reads the parameter types at decoration time.
from typing import Any

from kfp import dsl

from components import component
from llm2clip.config import Params

PIPELINE_NAME = "llm2clip"


def _stage(stage: str, common: Any, config: Any, **inputs: Any) -> dsl.PipelineTask:
    """One task of ``stage``: its component, shown under the stage's name, with lineage."""
    task = component(stage)(
        common=common,
        config=config,
        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        **inputs,
    )
    task.set_display_name(stage)
    return task


@dsl.pipeline(name=PIPELINE_NAME)
def llm2clip_pipeline(
    common: dict,
    prepare_data: dict,
    caption_contrastive: dict,
    embed_captions: dict,
    train_vision: dict,
    evaluate: dict,
    register: dict,
) -> None:
    """LLM2CLIP: train a CLIP vision encoder against a caption-tuned LLM text encoder.

    Args:
        common: The ``common`` params section (seed, MLflow experiment, caption fields).
        prepare_data: The ``prepare_data`` params section (sources, validation, sharding).
        caption_contrastive: The ``caption_contrastive`` section (base LLM, LoRA, steps).
        embed_captions: The ``embed_captions`` section (dtype, token budget, workers).
        train_vision: The ``train_vision`` section (tower, adapter, DeepSpeed, steps).
        evaluate: The ``evaluate`` section (eval sets, primary metric, quality gate).
        register: The ``register`` section (promotion margin, gate requirement).
    """
    data = _stage("prepare_data", common, prepare_data).outputs["data"]
    encoder = _stage("caption_contrastive", common, caption_contrastive, data=data).outputs["caption_encoder"]
    embeddings = _stage("embed_captions", common, embed_captions, data=data,
                        caption_encoder=encoder).outputs["embeddings"]
    model = _stage("train_vision", common, train_vision, data=data, embeddings=embeddings).outputs["vision_model"]
    report = _stage("evaluate", common, evaluate, data=data, embeddings=embeddings,
                    vision_model=model).outputs["report"]
    _stage("register", common, register, vision_model=model, caption_encoder=encoder, report=report)


def pipeline_arguments(params: Params) -> dict[str, dict[str, Any]]:
    """The pipeline's arguments: one plain JSON-able dict per section it takes.

    Raises:
        RuntimeError: The pipeline takes a section that ``Params`` does not have.
    """
    sections = params.to_dict()
    declared = list(llm2clip_pipeline.component_spec.inputs or {})
    missing = sorted(set(declared) - set(sections))
    if missing:
        raise RuntimeError(f"the pipeline takes params sections that Params lacks: {missing}")
    return {name: _without_nulls(sections[name]) for name in declared}


def _without_nulls(value: Any) -> Any:
    """KFP parameters cannot carry null; an absent key means the same (every optional field of
    the params schema defaults to None), and the task re-validates the section."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
