"""evaluate as a KFP component: the interface; the work is llm2clip.stages.evaluate.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    common: dict,
    config: dict,
    data: dsl.Input[dsl.Dataset],
    embeddings: dsl.Input[dsl.Dataset],
    vision_model: dsl.Input[dsl.Model],
    report: dsl.Output[dsl.Artifact],
    pipeline_run_id: str = "",
):
    """Retrieval and zero-shot metrics, comparison with the champion, and the quality gate.

    Runs ``llm2clip.stages.evaluate.run``, the same function as ``dvc repro evaluate``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``evaluate`` params section (eval sets, primary metric, gate threshold).
        data: prepare_data output (the eval images and captions).
        embeddings: embed_captions output (eval caption and class-prompt embeddings).
        vision_model: train_vision output (the model to evaluate).
        pipeline_run_id: Id of the pipeline run, recorded as an MLflow lineage tag; the
            pipeline passes the KFP run id.

    Returns:
        report: ``metrics.json``, recall@k plots, ``report.md``/``report.html`` and
            ``manifest.json`` with the primary metric and the gate decision.
    """
    from llm2clip.stages import run_stage

    paths = {
        "data": data.path,
        "embeddings": embeddings.path,
        "vision_model": vision_model.path,
        "report": report.path,
    }
    run_stage("evaluate", common, config, paths, pipeline_run_id)
