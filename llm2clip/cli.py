"""One command line over the stage table.

    llm2clip <stage> --params params.yaml [--set section.key=value ...] --<input> DIR --<output> DIR
    llm2clip <stage> --common-json '{...}' --config-json '{...}' --<input> DIR --<output> DIR

Every subcommand and its ``--<input>``/``--<output>`` flags come from
:data:`llm2clip.stages.STAGES`; nothing here is written per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from llm2clip.config import ConfigError, load_params, load_sections
from llm2clip.io import StageError
from llm2clip.stages import STAGES, launch

log = logging.getLogger("llm2clip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2clip",
        description="LLM2CLIP pipeline stages. Each stage reads params and writes a directory.",
    )
    parser.add_argument("--log-level", default=os.environ.get("LLM2CLIP_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for spec in STAGES.values():
        p = sub.add_parser(spec.name, help=spec.summary, description=spec.summary)
        p.add_argument("--params", type=Path, help="params YAML file (e.g. params.yaml)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override one value, e.g. --set prepare_data.shard_size=64 (repeatable)",
        )
        p.add_argument("--common-json", help="the common section as JSON (instead of --params)")
        p.add_argument("--config-json", help=f"the {spec.name} section as JSON")
        p.add_argument(
            "--pipeline-run-id", default=os.environ.get("LLM2CLIP_PIPELINE_RUN_ID", ""),
            help="id of the pipeline run this stage belongs to (MLflow lineage)",
        )
        for name in spec.inputs:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, required=True,
                           metavar="DIR", help=f"input: {name} directory (local or s3://)")
        for name in spec.outputs:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, required=True,
                           metavar="DIR", help=f"output: {name} directory (local or s3://)")
    return parser


def _configs(args: argparse.Namespace):
    if args.common_json is not None or args.config_json is not None:
        if args.params is not None or args.overrides:
            raise ConfigError("use either --params/--set or --common-json/--config-json")
        return load_sections(
            args.stage, json.loads(args.common_json or "{}"), json.loads(args.config_json or "{}")
        )
    params = load_params(args.params, args.overrides)
    return params.section(args.stage), params.common


def main(argv: list[str] | None = None) -> int:
    """Run one stage; exit code 0 on success, 2 on a config error, 1 on a stage failure."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    spec = STAGES[args.stage]
    try:
        cfg, common = _configs(args)
    except (ConfigError, json.JSONDecodeError) as err:
        log.error("configuration error: %s", err)
        return 2
    paths = {name: getattr(args, name) for name in spec.inputs + spec.outputs}
    try:
        result = launch(spec.name, cfg, common, paths, args.pipeline_run_id)
    except StageError as err:
        log.error("%s failed: %s", spec.name, err)
        return 1
    except subprocess.CalledProcessError as err:
        log.error("%s failed: torchrun exited with %s", spec.name, err.returncode)
        return 1
    if result is not None:
        log.info("%s done: %s", spec.name, json.dumps(result.summary(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
