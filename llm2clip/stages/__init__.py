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
    """

    name: str
    summary: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

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
        ),
        StageSpec(
            "register",
            "register the evaluated model in the MLflow registry; challenger/champion aliases",
            inputs=("vision_model", "caption_encoder", "report"),
            outputs=("registration",),
        ),
    )
}



def launch(stage: str, cfg: Any, common: Any, paths: dict[str, str], pipeline_run_id: str = "") -> Any:
    """Run ``stage`` with typed configs: in this process, or under torchrun when it asks for more.

    A stage whose config has ``nproc_per_node > 1`` is started under ``torchrun`` (unless this
    process already is a torchrun worker) with the same sections passed as JSON; each worker then
    calls the same ``run``. Returns ``run``'s result (None when torchrun ran it).
    """
    import json
    import os
    import subprocess
    import sys

    from llm2clip.config import to_dict

    nproc = getattr(cfg, "nproc_per_node", 1)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "llm2clip", stage,
               "--common-json", json.dumps(to_dict(common)), "--config-json", json.dumps(to_dict(cfg)),
               "--pipeline-run-id", pipeline_run_id]
        for name, path in paths.items():
            cmd += [f"--{name.replace('_', '-')}", str(path)]
        subprocess.run(cmd, check=True)
        return None
    return STAGES[stage].module().run(cfg, common, **paths, pipeline_run_id=pipeline_run_id)


def run_stage(stage: str, common: dict, config: dict, paths: dict[str, str],
              pipeline_run_id: str = "") -> Any:
    """Run one stage from plain dict sections: how every KFP component calls its stage."""
    from llm2clip.config import load_sections

    cfg, common_cfg = load_sections(stage, common, config)
    return launch(stage, cfg, common_cfg, paths, pipeline_run_id)
