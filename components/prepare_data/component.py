"""prepare_data as a KFP component: the interface; the work is llm2clip.stages.prepare_data.run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    common: dict,
    config: dict,
    data: dsl.Output[dsl.Dataset],
):
    """Validate image-caption sources and write split webdataset shards.

    Runs ``llm2clip.stages.prepare_data.run``, the same function as ``dvc repro prepare_data``.

    Args:
        common: The ``common`` params section (seed, MLflow experiment and tracking, S3
            endpoint, caption field names), validated like params.yaml; unknown keys fail.
        config: The ``prepare_data`` params section (sources, split fraction, shard size,
            image size, validation thresholds).

    Returns:
        data: Directory of ``{split}-NNNNNN.tar`` webdataset shards (``jpg`` + ``json`` with
            named captions), ``quarantine.jsonl`` with every rejected row and its reason, the
            validation report, and ``manifest.json`` (counts, shard checksums, config hash).
    """
    from llm2clip.cluster.task import run_task

    run_task("prepare_data", common, config, inputs={},
             outputs={"data": data})
