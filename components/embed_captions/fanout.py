"""embed_captions across pods: a group task per part and the merge (``shard_groups`` in the
cluster profile). The interfaces only; the work is llm2clip.stages.embed_captions.run_part / run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed_captions_group(common: dict, config: dict, part: int, parts: int, data: dsl.Input[dsl.Dataset],
                         caption_encoder: dsl.Input[dsl.Model], embeddings_part: dsl.Output[dsl.Dataset]):
    """Embed group task ``part``'s share of the image shards (of ``parts``), on every GPU of its pod.

    Args:
        common: The ``common`` params section.
        config: The ``embed_captions`` params section.
        part: This task's part, 0..parts-1.
        parts: Group tasks in the fan-out.
        data: prepare_data output.
        caption_encoder: caption_contrastive output.

    Returns:
        embeddings_part: The share's sidecars and done-markers, and ``part.json``, written last.
    """
    from llm2clip.cluster.task import run_task

    run_task("embed_captions", common, config, inputs={"data": data, "caption_encoder": caption_encoder},
             outputs={"embeddings": embeddings_part}, part=(part, parts))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed_captions_merge(common: dict, config: dict, data: dsl.Input[dsl.Dataset],
                         caption_encoder: dsl.Input[dsl.Model], parts: dsl.Input[list[dsl.Dataset]],
                         embeddings: dsl.Output[dsl.Dataset]):
    """Verify every group part's sidecars and write the embeddings from them (no model is loaded).

    Args:
        common: The ``common`` params section.
        config: The ``embed_captions`` params section.
        data: prepare_data output.
        caption_encoder: caption_contrastive output.
        parts: Every group task's ``embeddings_part``.

    Returns:
        embeddings: The embed_captions output, as one run would write it.
    """
    from llm2clip.cluster.task import run_task

    run_task("embed_captions", common, config, inputs={"data": data, "caption_encoder": caption_encoder},
             outputs={"embeddings": embeddings}, parts=parts)
