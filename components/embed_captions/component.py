"""embed_captions as a KFP component: the interface; the work is llm2clip.stages.embed_captions.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed_captions(
    common: dict,
    config: dict,
    data: dsl.Input[dsl.Dataset],
    caption_encoder: dsl.Input[dsl.Model],
    embeddings: dsl.Output[dsl.Dataset],
):
    """Embed every caption once with the frozen caption encoder into key-aligned sidecars.

    Runs ``llm2clip.stages.embed_captions.run``, the same function as ``dvc repro embed_captions``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``embed_captions`` params section (dtype, normalisation, token budget, workers).
        data: prepare_data output (image shards with named captions).
        caption_encoder: caption_contrastive output (the frozen tuned LLM and its settings).

    Returns:
        embeddings: ``X_text_embeddings.tar`` per image shard ``X.tar`` (same keys, same order),
            zero-shot prompt embeddings, and ``manifest.json`` with dim, dtype and the encoder fingerprint.
    """
    from llm2clip.cluster.task import run_task

    run_task("embed_captions", common, config, inputs={"data": data, "caption_encoder": caption_encoder},
             outputs={"embeddings": embeddings})
