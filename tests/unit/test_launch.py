"""launch(): when a stage starts its own torchrun workers, and never --standalone under another launcher.

A Kubeflow Trainer node runs with torchrun's own environment (``PET_NNODES``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``, ``PET_NPROC_PER_NODE``); a ``--standalone`` there would make every node a world
of its own and the job would hang at the first collective (kubeflow/sdk#142).
"""

import json

import pytest

from llm2clip.config import CaptionContrastiveConfig, CommonConfig, TrainVisionConfig
from llm2clip.stages import torchrun_command

PATHS = {"data": "s3://b/data", "embeddings": "s3://b/emb", "vision_model": "s3://b/out"}
TRAINER_NODE = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job",
                "PET_MASTER_PORT": "29500", "PET_NPROC_PER_NODE": "8"}


def command(nproc: int, environ: dict[str, str]) -> list[str] | None:
    return torchrun_command("train_vision", TrainVisionConfig(nproc_per_node=nproc), CommonConfig(), PATHS,
                            "run-1", environ=environ)


def test_one_process_without_a_launcher_runs_in_this_process():
    assert command(1, {}) is None


def test_a_worker_of_an_outer_torchrun_runs_in_this_process():
    assert command(2, {"LOCAL_RANK": "0", "WORLD_SIZE": "4"}) is None
    assert command(8, {**TRAINER_NODE, "LOCAL_RANK": "3"}) is None


def test_alone_on_a_machine_it_starts_standalone_workers():
    cmd = command(2, {})
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd
    at = cmd.index("llm2clip")
    assert cmd[at - 1] == "-m" and cmd[at + 1] == "train_vision"
    assert json.loads(cmd[cmd.index("--config-json") + 1])["nproc_per_node"] == 2
    assert cmd[cmd.index("--vision-model") + 1] == "s3://b/out" and cmd[cmd.index("--pipeline-run-id") + 1] == "run-1"


@pytest.mark.parametrize("nproc", [1, 8])
def test_on_a_trainer_node_torchrun_takes_the_rendezvous_from_pet(nproc):
    cmd = command(nproc, TRAINER_NODE)
    assert cmd is not None, "a multi-node job needs torchrun even for one process per node"
    assert "--standalone" not in cmd and not any(a.startswith("--nproc-per-node") for a in cmd)


def test_pet_without_a_process_count_uses_the_section():
    env = {k: v for k, v in TRAINER_NODE.items() if k != "PET_NPROC_PER_NODE"}
    cmd = torchrun_command("caption_contrastive", CaptionContrastiveConfig(nproc_per_node=4), CommonConfig(),
                           {"data": "d", "caption_encoder": "o"}, environ=env)
    assert "--standalone" not in cmd and "--nproc-per-node=4" in cmd
