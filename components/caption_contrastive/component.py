"""caption_contrastive as a KFP component: the interface; the work is llm2clip.stages.caption_contrastive.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def caption_contrastive(
    common: dict,
    config: dict,
    data: dsl.Input[dsl.Dataset],
    caption_encoder: dsl.Output[dsl.Model],
    pipeline_run_id: str = "",
):
    """Tune a decoder LLM into a caption encoder (bidirectional, mean pooling, LoRA, SimCSE).

    Runs ``llm2clip.stages.caption_contrastive.run``, the same function as ``dvc repro caption_contrastive``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``caption_contrastive`` params section (base model, LoRA, optimiser, steps,
            ``nproc_per_node``: >1 starts torchrun workers).
        data: prepare_data output: the captions of its train split are the training pairs,
            its val split the held-out CRA set.
        pipeline_run_id: Id of the pipeline run, recorded as an MLflow lineage tag; the
            pipeline passes the KFP run id.

    Returns:
        caption_encoder: The merged model (``save_pretrained``) with its tokenizer, the encoder settings
            (pooling, attention, prompt, max length), CRA before/after and ``manifest.json``.
    """
    from llm2clip.stages import run_stage

    paths = {
        "data": data.path,
        "caption_encoder": caption_encoder.path,
    }
    run_stage("caption_contrastive", common, config, paths, pipeline_run_id)
