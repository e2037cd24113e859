"""prepare_data from a DVC-versioned prepared dataset: the interface; the work is
llm2clip.stages.prepare_data.run_import."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data_import(common: dict, repo: str, path: str, data: dsl.Output[dsl.Dataset]):
    """Copy and check the prepare_data output that a git + DVC repository versions.

    Args:
        common: The ``common`` params section; ``data_revision`` is the revision read.
        repo: The repository (URL or path).
        path: The dataset's folder in it.

    Returns:
        data: The prepared data as it was versioned (byte for byte), checked shard by shard.
    """
    from llm2clip.cluster.task import run_import_task

    run_import_task(common, repo, path, data)
