"""Compile the pipeline to its IR YAML (what the KFP UI and ``kfp.Client`` take).

    python -m pipelines.compile [--cluster cpu|gpu|PATH] [--output build/llm2clip_pipeline.yaml]

The cluster profile (``params/cluster/<name>.yaml``) places every task: resources, GPUs,
tolerations, secrets, retries, TrainJobs. Compiling reads no environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kfp import compiler

from llm2clip.cluster.profile import load_cluster_profile
from llm2clip.config import ConfigError
from pipelines.llm2clip_pipeline import DEFAULT_PROFILE, build_pipeline

DEFAULT_OUTPUT = Path("build/llm2clip_pipeline.yaml")
log = logging.getLogger("pipelines.compile")


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT, cluster: str | Path = DEFAULT_PROFILE,
                     prepared: bool = False) -> Path:
    """Write the pipeline placed by cluster profile ``cluster`` to ``output`` (folders are created);
    ``prepared``: the variant that starts from a DVC-versioned prepared dataset.

    Raises:
        ConfigError: The cluster profile is missing or invalid.
    """
    output = Path(output)
    pipeline = build_pipeline(load_cluster_profile(cluster), prepared=prepared)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, package_path=str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the path of the written YAML (exit 2: a profile error)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="IR YAML to write")
    parser.add_argument("--cluster", default=DEFAULT_PROFILE,
                        help="cluster profile: a name in params/cluster/ (cpu, gpu) or a YAML path")
    parser.add_argument("--prepared", action="store_true",
                        help="the variant that starts from a DVC-versioned prepared dataset (prepared_repo, "
                        "prepared_path) instead of running prepare_data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = compile_pipeline(args.output, args.cluster, args.prepared)
    except ConfigError as err:
        log.error("cluster profile error: %s", err)
        return 2
    log.info("compiled pipeline with cluster profile %s", args.cluster)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
