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
    )
}
