"""Helpers of the Kubeflow-side tests: dvc.yaml and pipeline-IR readers, edge extraction.

A module with its own name (not conftest): ``from conftest import ...`` would get whichever
conftest.py pytest imported last.
"""

import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # components/ and pipelines/ live in the repo, not in the venv
    sys.path.insert(0, str(REPO))


def load_dvc_stages(path: Path = REPO / "dvc.yaml") -> dict:
    """``stages`` of a dvc.yaml, in file order."""
    return yaml.safe_load(path.read_text())["stages"]


def parse_dvc_cmd(cmd: str) -> tuple[list[str], str, dict[str, str]]:
    """``[launcher...] -m llm2clip <stage> --flag value ...`` -> (launcher, stage, flags).

    The launcher is ``python`` or a ``torchrun ...`` prefix; every flag after the stage takes
    one value.
    """
    argv = shlex.split(cmd)
    at = argv.index("llm2clip")
    assert argv[at - 1] == "-m", f"not `-m llm2clip`: {cmd}"
    launcher, stage, rest = argv[: at - 1], argv[at + 1], argv[at + 2 :]
    assert len(rest) % 2 == 0 and all(f.startswith("--") for f in rest[::2]), f"flag/value pairs: {cmd}"
    return launcher, stage, dict(zip(rest[::2], rest[1::2], strict=True))


def dvc_edges(stages: dict) -> set[tuple[str, str, str]]:
    """``(producer, consumer, input name)``: a consumer's dep is (or is inside) a producer's out.

    The input name is the consumer's CLI flag that carries the path (``--caption-llm`` ->
    ``caption_llm``); ``""`` when the dep is no flag of the command.
    """
    outs = {str(o): name for name, s in stages.items() for o in s.get("outs", [])}
    edges = set()
    for consumer, stage in stages.items():
        flags = {v: k[2:].replace("-", "_") for k, v in parse_dvc_cmd(stage["cmd"])[2].items()}
        for dep in map(str, stage.get("deps", [])):
            for out, producer in outs.items():
                if dep == out or dep.startswith(out.rstrip("/") + "/"):
                    edges.add((producer, consumer, flags.get(dep, "")))
    return edges


def pipeline_tasks(ir: dict) -> dict[str, dict]:
    """The IR's root DAG tasks keyed by display name (= stage name)."""
    return {t["taskInfo"]["name"]: t for t in ir["root"]["dag"]["tasks"].values()}


def pipeline_edges(ir: dict) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """Artifact edges ``(producer, consumer, input name)`` and every task dependency edge.

    The second set also holds the ``dependentTasks`` (data or ``.after()``) of each task.
    """
    display = {key: t["taskInfo"]["name"] for key, t in ir["root"]["dag"]["tasks"].items()}
    artifact_edges, all_edges = set(), set()
    for key, task in ir["root"]["dag"]["tasks"].items():
        for name, spec in task.get("inputs", {}).get("artifacts", {}).items():
            producer = spec["taskOutputArtifact"]["producerTask"]
            artifact_edges.add((display[producer], display[key], name))
            all_edges.add((display[producer], display[key]))
        all_edges |= {(display[dep], display[key]) for dep in task.get("dependentTasks", [])}
    return artifact_edges, all_edges


def registry_edges(stages) -> set[tuple[str, str, str]]:
    """``(producer, consumer, name)``: a stage's input named like an earlier stage's output."""
    edges, produced = set(), {}
    for spec in stages.values():
        edges |= {(produced[name], spec.name, name) for name in spec.inputs if name in produced}
        produced.update({name: spec.name for name in spec.outputs})
    return edges


def fanout_profile(folder: Path, groups: dict[str, int]) -> Path:
    """The cpu cluster profile with ``shard_groups`` for the given stages, one retry after 1 s
    (kfp.local honours both); returns the file."""
    raw = yaml.safe_load((REPO / "params" / "cluster" / "cpu.yaml").read_text())
    for stage, n in groups.items():
        raw["stages"][stage] = {**raw["stages"].get(stage, {}), "shard_groups": n, "retries": 1,
                                "backoff_duration": "1s"}
    path = Path(folder) / "fanout.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
