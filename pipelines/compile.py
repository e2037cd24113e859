"""Compile the pipeline to its IR YAML (what the KFP UI and ``kfp.Client`` take).

    python -m pipelines.compile [--output build/llm2clip_pipeline.yaml]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kfp import compiler

from pipelines.llm2clip_pipeline import llm2clip_pipeline

DEFAULT_OUTPUT = Path("build/llm2clip_pipeline.yaml")
log = logging.getLogger("pipelines.compile")


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT) -> Path:
    """Write the pipeline's IR YAML to ``output`` (parent folders are created)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(llm2clip_pipeline, package_path=str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the path of the written YAML."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="IR YAML to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = compile_pipeline(args.output)
    log.info("compiled pipeline %s", llm2clip_pipeline.name)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
