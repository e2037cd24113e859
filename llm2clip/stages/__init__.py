"""The stage registry: the one list of stages that the CLI, dvc.yaml and the KFP pipeline share.

A stage is one library function ``llm2clip.stages.<name>.run(cfg, common, *, <inputs>,
<outputs>, pipeline_run_id="")``. Inputs and outputs are directories; their names are the CLI
flags (``--data``), the dvc.yaml paths' roles and the KFP artifact parameter names. The parity
test (tests/kfp/test_parity.py) checks that dvc.yaml and the compiled pipeline agree with this
table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage table.

    Attributes:
        name: Spelled the same everywhere: params section, dvc stage, module, component, task.
        summary: One line for ``llm2clip --help``.
        inputs: Names of the input directories, produced by earlier stages.
        outputs: Names of the output directories this stage creates.
        per_eval_set: For a stage that also runs once per evaluation set (``--eval-set NAME``:
            prepare_data and embed_captions), the name under which those outputs, collected
            over the sets, reach later stages.
        collected: Inputs that are several directories, one per evaluation set: on the command
            line a folder whose sub-folders are taken (``--eval-data data/eval``), in KFP a
            ``dsl.Collected`` list over the eval-set ParallelFor. Optional: none means no sets.
        fans_out: The stage can run across pods (:mod:`llm2clip.data.parts`): group tasks
            (``run_part``, CLI ``--part G/N``, the output flag naming the part folder) and a merge
            (``run(..., parts=[...])``, CLI ``--parts DIR...``).
    """

    name: str
    summary: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    per_eval_set: str = ""
    collected: tuple[str, ...] = ()
    fans_out: bool = False

    @property
    def part_output(self) -> str:
        """The keyword of ``run_part``'s output folder: ``<output>_part`` (``data_part``)."""
        return f"{self.outputs[0]}_part"

    def module(self) -> ModuleType:
        """Import the stage module lazily (heavy imports stay out of ``--help``)."""
        return importlib.import_module(f"llm2clip.stages.{self.name}")


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "prepare_data",
            "validate image-caption sources and write split webdataset shards",
            inputs=(),
            outputs=("data",),
            per_eval_set="eval_data",
            fans_out=True,
        ),
        StageSpec(
            "caption_contrastive",
            "tune a decoder LLM into a caption encoder (bidirectional, mean pooling, LoRA); CRA before/after",
            inputs=("data",),
            outputs=("caption_encoder",),
        ),
        StageSpec(
            "embed_captions",
            "embed every caption once with the frozen caption encoder into key-aligned sidecar shards",
            inputs=("data", "caption_encoder"),
            outputs=("embeddings",),
            per_eval_set="eval_embeddings",
            fans_out=True,
        ),
        StageSpec(
            "train_vision",
            "train the vision tower + LLM adapter with the CLIP loss on offline embeddings (DeepSpeed)",
            inputs=("data", "embeddings"),
            outputs=("vision_model",),
        ),
        StageSpec(
            "evaluate",
            "retrieval and zero-shot metrics, champion comparison, quality gate, report",
            inputs=("data", "embeddings", "vision_model"),
            outputs=("report",),
            collected=("eval_data", "eval_embeddings"),
        ),
        StageSpec(
            "register",
            "register the evaluated model in the MLflow registry; challenger/champion aliases",
            inputs=("vision_model", "caption_encoder", "report"),
            outputs=("registration",),
        ),
    )
}



_OUTER_LAUNCHER_ENV = ("LOCAL_RANK", "PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR")


def torchrun_command(stage: str, cfg: Any, common: Any, paths: dict[str, str], pipeline_run_id: str = "",
                     environ: dict[str, str] | None = None) -> list[str] | None:
    """The ``torchrun`` command that starts ``stage``'s workers, or None to run in this process.

    None when the stage asks for one process, or when this process already is a worker
    (``LOCAL_RANK``). Under a Kubeflow Trainer node (``PET_NNODES``/``PET_NODE_RANK``/
    ``PET_MASTER_ADDR``: torchrun's own environment) the command has neither ``--standalone`` nor
    ``--nproc-per-node``: torchrun takes the rendezvous and the process count from ``PET_*``, and
    a ``--standalone`` there would make every node a world of its own (a multi-node job hangs).
    """
    import json
    import os
    import sys

    from llm2clip.config import to_dict

    environ = os.environ if environ is None else environ
    nproc = getattr(cfg, "nproc_per_node", 1)
    trainer_node = any(name in environ for name in _OUTER_LAUNCHER_ENV[1:])
    if "LOCAL_RANK" in environ or (nproc <= 1 and not trainer_node):
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if not trainer_node:
        cmd += ["--standalone", f"--nproc-per-node={nproc}"]
    elif "PET_NPROC_PER_NODE" not in environ:
        cmd += [f"--nproc-per-node={nproc}"]
    cmd += ["-m", "llm2clip", stage, "--common-json", json.dumps(to_dict(common)),
            "--config-json", json.dumps(to_dict(cfg)), "--pipeline-run-id", pipeline_run_id]
    for name, path in paths.items():
        cmd += [f"--{name.replace('_', '-')}", str(path)]
    return cmd


def launch(stage: str, cfg: Any, common: Any, paths: dict[str, str], pipeline_run_id: str = "",
           part: tuple[int, int] | None = None, parts: list[str] | None = None) -> Any:
    """Run ``stage`` with typed configs: in this process, or under torchrun when it asks for more.

    See :func:`torchrun_command` for when workers are started. Returns ``run``'s result (None
    when torchrun ran it). A stage that fans out runs group task ``part = (g, N)`` (its output
    path is the part folder) or, with ``parts``, the merge of those folders.
    """
    import subprocess

    spec = STAGES[stage]
    if (part is not None or parts) and not spec.fans_out:
        raise ValueError(f"{stage} does not fan out (--part/--parts: {', '.join(fanning_out())})")
    if part is not None:
        (output,) = spec.outputs
        kwargs = {k: v for k, v in paths.items() if k != output} | {spec.part_output: paths[output]}
        return spec.module().run_part(cfg, common, part=part[0], parts=part[1], **kwargs,
                                      pipeline_run_id=pipeline_run_id)
    if parts:
        return spec.module().run(cfg, common, **paths, parts=parts, pipeline_run_id=pipeline_run_id)
    cmd = torchrun_command(stage, cfg, common, paths, pipeline_run_id)
    if cmd is not None:
        subprocess.run(cmd, check=True)
        return None
    return STAGES[stage].module().run(cfg, common, **paths, pipeline_run_id=pipeline_run_id)


def fanning_out() -> list[str]:
    """The stages that can run as group tasks and a merge."""
    return [name for name, spec in STAGES.items() if spec.fans_out]


def output_metadata(directory: str, endpoint_url: str = "", result: Any = None) -> dict[str, Any]:
    """Scalars that describe a finished output (for a KFP artifact's metadata).

    The output's ``manifest.json`` flattened (``counts.train``, ``primary``, ``gate_passed``,
    ...), numbers, booleans and short strings only, plus the stage result's summary when the
    stage ran in this process.
    """
    from llm2clip.io import read_manifest

    return manifest_metadata(read_manifest(directory, endpoint_url), result)


def manifest_metadata(manifest: dict[str, Any], result: Any = None) -> dict[str, Any]:
    """The scalars of :func:`output_metadata` from an already read manifest."""
    from llm2clip.tracking import flatten

    values = flatten({k: v for k, v in manifest.items() if k != "files"})
    if result is not None:
        values |= flatten(result.summary())
    return {k: v for k, v in sorted(values.items())
            if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 200)}


def run_stage(stage: str, common: dict, config: dict, paths: dict[str, str],
              pipeline_run_id: str = "", part: tuple[int, int] | None = None,
              parts: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run one stage from plain dict sections: how a KFP task runs its stage in its own pod
    (``part``/``parts``: a group task or the merge of a fan-out, see :func:`launch`).

    Returns:
        ``{output name: metadata}`` (:func:`output_metadata` of each output; a group task's
        output: its part record's scalars).
    """
    from llm2clip.config import load_sections

    cfg, common_cfg = load_sections(stage, common, config)
    result = launch(stage, cfg, common_cfg, paths, pipeline_run_id, part=part, parts=parts)
    if part is not None:
        from llm2clip.tracking import flatten

        record = result if isinstance(result, dict) else result.summary()
        values = {k: v for k, v in flatten(record).items() if isinstance(v, (bool, int, float, str))}
        return {name: dict(sorted(values.items())) for name in STAGES[stage].outputs}
    return {name: output_metadata(paths[name], common_cfg.s3_endpoint_url, result)
            for name in STAGES[stage].outputs}
