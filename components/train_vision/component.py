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
    num_nodes: int = 1,
    trainjob_image: str = "",
):
    """Train the CLIP vision tower and the LLM adapter on the offline caption embeddings (DeepSpeed).

    Runs ``llm2clip.stages.train_vision.run``, the same function as ``dvc repro train_vision``:
    in this pod, or on every rank of a Kubeflow Trainer TrainJob.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``train_vision`` params section (tower, adapter, optimiser, DeepSpeed, steps,
            ``nproc_per_node``: processes per node, each node's torchrun workers).
        data: prepare_data output (the images).
        embeddings: embed_captions output (key-aligned caption embeddings).
        num_nodes: Nodes of the TrainJob, from the stage's cluster profile; a parameter so that
            it is part of the cache key (it sets the world size, so the global batch).
        trainjob_image: Image of the TrainJob's nodes; empty runs the stage in this task's pod.

    Returns:
        vision_model: The exported model (``model.safetensors`` + ``llm2clip_config.json``), the
            resumable DeepSpeed checkpoints, training curves and ``manifest.json``.
    """
    from llm2clip.cluster.task import run_task

    run_task("train_vision", common, config, inputs={"data": data, "embeddings": embeddings},
             outputs={"vision_model": vision_model}, num_nodes=num_nodes, trainjob_image=trainjob_image)
