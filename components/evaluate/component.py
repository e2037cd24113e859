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
    eval_data: dsl.Input[list[dsl.Dataset]],
    eval_embeddings: dsl.Input[list[dsl.Dataset]],
    report: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report_html: dsl.Output[dsl.HTML],
    report_markdown: dsl.Output[dsl.Markdown],
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
        eval_data: prepare_data outputs of the evaluation sets (the ``eval_data`` section),
            collected over the eval-set ParallelFor; each names its set in its manifest.
        eval_embeddings: embed_captions outputs of the same sets.

    Returns:
        report: ``metrics.json``, recall@k plots, ``report.md``/``report.html`` and
            ``manifest.json`` with the primary metric and the gate decision.
        metrics: Every scalar of ``metrics.json`` (what the KFP UI compares across runs).
        report_html: The report with its recall plots, rendered in the KFP UI.
        report_markdown: The report's tables as Markdown, rendered in the KFP UI.
    """
    from llm2clip.cluster.task import publish_report, run_task

    run_task("evaluate", common, config,
             inputs={"data": data, "embeddings": embeddings, "vision_model": vision_model,
                     "eval_data": eval_data, "eval_embeddings": eval_embeddings},
             outputs={"report": report})
    publish_report(report, common, metrics=metrics, html=report_html, markdown=report_markdown)
