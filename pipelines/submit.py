"""Validate params and start a pipeline run on a Kubeflow Pipelines cluster.

    python -m pipelines.submit --host URL --params params/full.yaml [--set section.key=value ...]
                               [--experiment NAME] [--run-name NAME] [--namespace NS]

The params file is loaded and validated *before* anything is sent, so a typo fails here in
seconds, not hours into a GPU job. Each params section becomes one pipeline argument.
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from llm2clip.config import ConfigError, load_params
from pipelines.compile import compile_pipeline
from pipelines.llm2clip_pipeline import pipeline_arguments

log = logging.getLogger("pipelines.submit")


def build_parser() -> argparse.ArgumentParser:
    """The command line (kept separate so tests can read its defaults)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example/pipeline")
    p.add_argument("--params", type=Path, required=True, help="params YAML, e.g. params/full.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one value (repeatable)")
    p.add_argument("--experiment", help="KFP experiment (default: common.experiment)")
    p.add_argument("--run-name", help="run name (default: KFP's pipeline name + time)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    p.add_argument("--service-account", help="service account the run's pods use")
    p.add_argument("--pipeline-root", help="artifact root, e.g. s3://bucket/pipeline-root")
    p.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    return p


def submit(args: argparse.Namespace, arguments: dict[str, Any], experiment: str) -> Any:
    """Compile the pipeline and create the run; returns kfp's ``RunPipelineResult``."""
    import kfp

    client = kfp.Client(host=args.host, **({"namespace": args.namespace} if args.namespace else {}))
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "llm2clip_pipeline.yaml")
        return client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=args.run_name,
            experiment_name=experiment, namespace=args.namespace,
            pipeline_root=args.pipeline_root, service_account=args.service_account,
            enable_caching=False if args.no_cache else None,
        )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: exit 0 once the run is created, 2 on a params error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as err:
        log.error("configuration error (nothing was submitted): %s", err)
        return 2
    experiment = args.experiment or params.common.experiment
    result = submit(args, pipeline_arguments(params), experiment)
    log.info("created run %s in experiment %s", result.run_id, experiment)
    print(result.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
