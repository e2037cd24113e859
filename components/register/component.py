"""register as a KFP component: the interface; the work is llm2clip.stages.register.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    common: dict,
    config: dict,
    vision_model: dsl.Input[dsl.Model],
    caption_encoder: dsl.Input[dsl.Model],
    report: dsl.Input[dsl.Artifact],
    registration: dsl.Output[dsl.Artifact],
):
    """Register the evaluated model in the MLflow registry and move the aliases.

    Runs ``llm2clip.stages.register.run``, the same function as ``dvc repro register``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``register`` params section (promotion margin, gate requirement).
        vision_model: train_vision output (what is registered).
        caption_encoder: caption_contrastive output (registered once as its own model, linked by tags).
        report: evaluate output (metrics and gate decision; registration refuses without them).

    Returns:
        registration: ``registration.json`` (model URI, version, aliases, decision) and ``manifest.json``.
    """
    from llm2clip.cluster.task import run_task

    run_task("register", common, config,
             inputs={"vision_model": vision_model, "caption_encoder": caption_encoder, "report": report},
             outputs={"registration": registration})
