"""prepare_data across pods: a group task per part and the merge (``shard_groups`` in the cluster
profile). The interfaces only; the work is llm2clip.stages.prepare_data.run_part / run."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data_group(common: dict, config: dict, part: int, parts: int, data_part: dsl.Output[dsl.Dataset]):
    """Validate and re-encode group task ``part``'s share of the source groups (of ``parts``).

    Args:
        common: The ``common`` params section.
        config: The ``prepare_data`` params section.
        part: This task's part, 0..parts-1.
        parts: Group tasks in the fan-out.

    Returns:
        data_part: The share's group files (``.groups/``) and ``part.json``, written last.
    """
    from llm2clip.cluster.task import run_task

    run_task("prepare_data", common, config, inputs={}, outputs={"data": data_part}, part=(part, parts))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data_merge(common: dict, config: dict, parts: dsl.Input[list[dsl.Dataset]],
                       data: dsl.Output[dsl.Dataset]):
    """Check every group part and write the prepared data from them, as one run would.

    Args:
        common: The ``common`` params section.
        config: The ``prepare_data`` params section.
        parts: Every group task's ``data_part``.

    Returns:
        data: The prepare_data output (shards, quarantine, validation, ``manifest.json``).
    """
    from llm2clip.cluster.task import run_task

    run_task("prepare_data", common, config, inputs={}, outputs={"data": data}, parts=parts)
