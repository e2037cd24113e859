"""train_vision as a KFP component: the interface; the work is llm2clip.stages.train_vision.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_vision(
    common: dict,
    config: dict,
    data: dsl.Input[dsl.Dataset],
    embeddings: dsl.Input[dsl.Dataset],
    vision_model: dsl.Output[dsl.Model],
    pipeline_run_id: str = "",
):
    """Train the CLIP vision tower and the LLM adapter on the offline caption embeddings (DeepSpeed).

    Runs ``llm2clip.stages.train_vision.run``, the same function as ``dvc repro train_vision``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``train_vision`` params section (tower, adapter, optimiser, DeepSpeed, steps,
            ``nproc_per_node``: >1 starts torchrun workers).
        data: prepare_data output (the images).
        embeddings: embed_captions output (key-aligned caption embeddings).
        pipeline_run_id: Id of the pipeline run, recorded as an MLflow lineage tag; the
            pipeline passes the KFP run id.

    Returns:
        vision_model: The exported model (``model.safetensors`` + ``llm2clip_config.json``), the
            resumable DeepSpeed checkpoints, training curves and ``manifest.json``.
    """
    from llm2clip.stages import run_stage

    paths = {
        "data": data.path,
        "embeddings": embeddings.path,
        "vision_model": vision_model.path,
    }
    run_stage("train_vision", common, config, paths, pipeline_run_id)
