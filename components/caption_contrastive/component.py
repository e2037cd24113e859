"""caption_contrastive as a KFP component: the interface; the work is llm2clip.stages.caption_contrastive.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def caption_contrastive(
    common: dict,
    config: dict,
    data: dsl.Input[dsl.Dataset],
    caption_encoder: dsl.Output[dsl.Model],
    num_nodes: int = 1,
    trainjob_image: str = "",
):
    """Tune a decoder LLM into a caption encoder (bidirectional, mean pooling, LoRA, SimCSE).

    Runs ``llm2clip.stages.caption_contrastive.run``, the same function as ``dvc repro caption_contrastive``:
    in this pod, or on every rank of a Kubeflow Trainer TrainJob.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``caption_contrastive`` params section (base model, LoRA, optimiser, steps,
            ``nproc_per_node``: processes per node, each node's torchrun workers).
        data: prepare_data output: the captions of its train split are the training pairs,
            its val split the held-out CRA set.
        num_nodes: Nodes of the TrainJob, from the stage's cluster profile; a parameter so that
            it is part of the cache key (it sets the world size, so the global batch).
        trainjob_image: Image of the TrainJob's nodes; empty runs the stage in this task's pod.

    Returns:
        caption_encoder: The merged model (``save_pretrained``) with its tokenizer, the encoder settings
            (pooling, attention, prompt, max length), CRA before/after and ``manifest.json``.
    """
    from llm2clip.cluster.task import run_task

    run_task("caption_contrastive", common, config, inputs={"data": data},
             outputs={"caption_encoder": caption_encoder}, num_nodes=num_nodes, trainjob_image=trainjob_image)
