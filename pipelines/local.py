"""Run the whole pipeline on this machine with ``kfp.local`` (no cluster, no Docker).

    python -m pipelines.local [--params params.yaml] [--set section.key=value ...]
                              [--data-revision REV] [--pipeline-root local_outputs]
                              [--cluster PROFILE] [--cache]

Tasks run as subprocesses of the current interpreter (``SubprocessRunner(use_venv=False)``):
the components install nothing (``install_kfp_package=False``, no ``packages_to_install``), so
the venv is used as it is. Outputs land in ``<pipeline-root>/llm2clip-<timestamp>/<task>/<output>``.

The run id reaches every task the way it does on a cluster, as ``$LLM2CLIP_PIPELINE_RUN_ID``
(there from the pod's ``pipeline/runid`` label; here ``local-<time>-<random>``), not as a task
parameter, so it never enters a cache key. A cluster profile's pod settings (resources, GPUs,
secrets) do not apply under ``kfp.local``; its shape does: ``--cluster`` with ``shard_groups``
runs the fan-out (ParallelFor of group tasks + merge, kfp.local runs the items in parallel and
honours the retry policy). ``--cache`` turns on kfp.local's task cache (under the pipeline root).
"""

import argparse
import logging
import os
import secrets
import sys
import time
import warnings
from pathlib import Path

from llm2clip.cluster.task import PIPELINE_RUN_ENV
from llm2clip.config import ConfigError, Params, load_params
from llm2clip.stages import STAGES
from pipelines.llm2clip_pipeline import (
    PIPELINE_NAME,
    build_pipeline,
    data_revision_override,
    llm2clip_pipeline,
    pipeline_arguments,
    prepared_dataset,
)

log = logging.getLogger("pipelines.local")


def local_run_id() -> str:
    """A run id for one kfp.local run: ``local-<UTC time>-<6 hex>``."""
    return f"local-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def run_local(params: Params, pipeline_root: str | Path = "local_outputs", run_id: str | None = None,
              cluster: str | Path | None = None, cache: bool = False,
              prepared: tuple[str, str] | None = None) -> Path:
    """Run the pipeline with ``params`` under ``kfp.local``; returns this run's output folder.

    Args:
        cluster: A cluster profile (name or file) whose DAG shape to run (its fan-outs).
        cache: Reuse the outputs of tasks that ran before with the same inputs.
        prepared: ``(repo, path)``: start from that DVC-versioned prepared dataset (read at
            ``common.data_revision``) instead of running prepare_data.

    Raises:
        RuntimeError: A task failed (kfp.local logs the task's output first).
        ConfigError: An invalid cluster profile.
    """
    from kfp import local

    from llm2clip.cluster.profile import load_cluster_profile

    pipeline = (build_pipeline(load_cluster_profile(cluster) if cluster else None, prepared=bool(prepared))
                if cluster or prepared else llm2clip_pipeline)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=cache)
    before = set(root.glob(f"{PIPELINE_NAME}-*"))
    with warnings.catch_warnings():
        # kfp.local guesses from the image *name* whether it holds Python; ours does.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        previous = os.environ.get(PIPELINE_RUN_ENV)
        os.environ[PIPELINE_RUN_ENV] = run_id or local_run_id()  # the task subprocesses inherit it
        try:
            pipeline(**pipeline_arguments(params, prepared=prepared))
        finally:
            if previous is None:
                os.environ.pop(PIPELINE_RUN_ENV, None)
            else:
                os.environ[PIPELINE_RUN_ENV] = previous
    (run_dir,) = set(root.glob(f"{PIPELINE_NAME}-*")) - before
    return run_dir


def stage_outputs(run_dir: Path) -> dict[str, dict[str, Path]]:
    """``{stage: {output name: directory}}`` of one local run (task folders use dashes; a stage
    that fanned out has its outputs in its merge task's folder, prepared data imported from DVC
    in the import task's)."""
    def folder(stage: str) -> Path:  # the stage's own task, its fan-out's merge, or the prepared data's import
        plain = run_dir / stage.replace("_", "-")
        found = [f for f in (plain, plain.with_name(f"{plain.name}-merge"), plain.with_name(f"{plain.name}-import"))
                 if f.is_dir()]
        return found[0] if found else plain

    return {stage: {name: folder(stage) / name for name in spec.outputs} for stage, spec in STAGES.items()}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: exit 0 on success, 2 on a params error, 1 on a failed task."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one value (repeatable)")
    parser.add_argument("--data-revision", metavar="REV",
                        help="git revision of the DVC-tracked data (common.data_revision): dvc sources "
                        "without a rev read at it; recorded in MLflow and on the registered model")
    parser.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                        help="where kfp.local writes the runs' artifacts")
    parser.add_argument("--cluster", metavar="PROFILE",
                        help="cluster profile whose DAG shape to run (e.g. its shard_groups fan-outs); "
                        "pod settings do not apply locally")
    parser.add_argument("--cache", action="store_true", help="reuse task outputs of earlier runs (kfp.local cache)")
    parser.add_argument("--prepared-repo", metavar="REPO",
                        help="start from the prepared dataset this git + DVC repository versions (at --data-revision)")
    parser.add_argument("--prepared-path", default="data/prepared", metavar="PATH",
                        help="the dataset's folder in --prepared-repo (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        params = load_params(args.params, args.overrides + data_revision_override(args.data_revision))
        prepared = prepared_dataset(args.prepared_repo, args.prepared_path, params)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        return 2
    try:
        run_dir = run_local(params, args.pipeline_root, cluster=args.cluster, cache=args.cache, prepared=prepared)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        return 2
    except RuntimeError as err:
        log.error("local pipeline run failed: %s", err)
        return 1
    for stage, outputs in stage_outputs(run_dir).items():
        for name, path in outputs.items():
            log.info("%s: %s -> %s", stage, name, path)
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
