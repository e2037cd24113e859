"""A Kubeflow Trainer TrainJob's nodes, emulated on 127.0.0.1 with no shared disk.

Each "node" is a process started the way the Trainer's torch plugin starts one: the TrainJob's
own ``command`` + ``args`` (from :func:`llm2clip.cluster.trainjob.build_trainjob`) with
``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT``/``PET_NPROC_PER_NODE``
and the job's env, its own working directory and ``$TMPDIR``. Data, outputs and checkpoints live
on S3 (a moto server). Two nodes x 1 process must train to the same result as one node x 2
processes (the same world size, so the same global batch) started by ``llm2clip <stage>``
(``torchrun --standalone``): tolerance 1e-6 on every weight (gloo sums two ranks in the same order
both ways; it is bit-exact here, the tolerance allows for reduction-order changes). train_vision is
also killed after its first committed S3 checkpoint (every node at once, like a lost node pool) and
started again: it resumes from S3 and still ends on the one-node weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny_pipeline import tiny_params

from llm2clip.cluster.profile import ClusterProfile, TaskProfile
from llm2clip.cluster.trainjob import build_trainjob
from llm2clip.config import Params, from_dict, to_dict
from llm2clip.io import s3_filesystem
from llm2clip.train.distributed import free_port

BIN = Path(sys.executable).parent
PROFILE = ClusterProfile(name="test", tasks={
    "caption_contrastive": TaskProfile(launcher="trainjob", num_nodes=2),
    "train_vision": TaskProfile(launcher="trainjob", num_nodes=2)})


def base_env(tmp: Path) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "LLM2CLIP_LOG_LEVEL": "INFO"}


def cli(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "llm2clip", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server):
    """Tiny params (tracking off), a bucket, and prepare_data's output on it."""
    import boto3

    root = tmp_path_factory.mktemp("trainjob_nodes")
    raw = tiny_params(root)
    raw["common"].update(tracking=False, s3_endpoint_url=s3_server)
    raw["caption_contrastive"].update(max_steps=4, checkpoint_every=2)
    raw["train_vision"].update(max_steps=8, checkpoint_every=2)
    params = from_dict(Params, {k: raw[k] for k in ("common", "prepare_data", "caption_contrastive",
                                                    "embed_captions", "train_vision")})
    bucket = f"nodes-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    sections = {k: to_dict(v) for k, v in params.__dict__.items()}
    env = base_env(root / "tmp")
    cli(["prepare_data", "--common-json", json.dumps(sections["common"]), "--config-json",
         json.dumps(sections["prepare_data"]), "--data", f"s3://{bucket}/data"], root, env)
    return root, bucket, sections, s3_server


def one_node(world, stage: str, uris: dict[str, str]) -> None:
    """``llm2clip <stage>`` with nproc_per_node 2: launch() starts torchrun --standalone."""
    root, _, sections, _ = world
    config = sections[stage] | {"nproc_per_node": 2}
    args = [stage, "--common-json", json.dumps(sections["common"]), "--config-json", json.dumps(config)]
    for name, uri in uris.items():
        args += [f"--{name.replace('_', '-')}", uri]
    cli(args, root, base_env(root / "tmp-one"))


def start_nodes(world, stage: str, uris: dict[str, str], attempt: str, plain_cli: bool = False
                ) -> list[subprocess.Popen]:
    """The TrainJob's command on two emulated nodes, each with its own cwd and $TMPDIR.

    ``plain_cli``: run ``python -m llm2clip <stage>`` instead of the job's ``torchrun -m llm2clip``
    (what a hand-written TrainJob might do): launch() must then start torchrun from ``PET_*``.
    """
    root, _, sections, _ = world
    job = build_trainjob(stage=stage, common=sections["common"], config=sections[stage] | {"nproc_per_node": 1},
                         uris=uris, image="unused", profile=PROFILE, pipeline_run_id="run-nodes")
    trainer = job["spec"]["trainer"]
    assert trainer["command"][0] == "torchrun" and "--standalone" not in trainer["command"] + trainer["args"]
    job_env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}  # secrets: the test's creds
    port, procs = free_port(), []
    for rank in range(trainer["numNodes"]):
        node = root / f"{stage}-{attempt}-node{rank}"
        env = base_env(node / "tmp") | job_env | {
            "PET_NNODES": str(trainer["numNodes"]), "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"])}
        launcher = [sys.executable] if plain_cli else [str(BIN / "torchrun")]
        command = [*launcher, *trainer["command"][1:], *trainer["args"]]
        procs.append(subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, preexec_fn=lambda: os.nice(10)))
    return procs


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-6000:]


def weights(fs, uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(fs.cat(f"{uri}/model.safetensors"))


def assert_same_weights(fs, a: str, b: str, tol: float = 1e-6) -> None:
    wa, wb = weights(fs, a), weights(fs, b)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert diff <= tol, f"max |w_two_nodes - w_one_node| = {diff}"


def manifest(fs, uri: str) -> dict:
    return json.loads(fs.cat(f"{uri}/manifest.json"))


def test_caption_contrastive_two_nodes_equal_one(world):
    root, bucket, _, endpoint = world
    fs, base = s3_filesystem(endpoint), f"s3://{bucket}"
    one, two = f"{base}/cc-one", f"{base}/cc-two"
    one_node(world, "caption_contrastive", {"data": f"{base}/data", "caption_encoder": one})
    finish(start_nodes(world, "caption_contrastive", {"data": f"{base}/data", "caption_encoder": two}, "a"))
    assert_same_weights(fs, one, two)
    m1, m2 = manifest(fs, one), manifest(fs, two)
    assert m2["training"]["world_size"] == m1["training"]["world_size"] == 2
    assert m2["training"]["global_batch"] == m1["training"]["global_batch"]
    assert abs(m2["cra_after"]["cra"] - m1["cra_after"]["cra"]) <= 1e-9
    assert not fs.exists(f"{two}.ckpt"), "checkpoints are removed after success (keep_checkpoints: 0)"

    # the same nodes running the plain CLI: launch() starts torchrun from PET_* (no --standalone,
    # which would make each node a world of one and hang the job)
    plain = f"{base}/cc-plain"
    finish(start_nodes(world, "caption_contrastive", {"data": f"{base}/data", "caption_encoder": plain}, "p",
                       plain_cli=True))
    assert_same_weights(fs, one, plain)
    assert manifest(fs, plain)["training"]["world_size"] == 2


def test_train_vision_two_nodes_killed_and_resumed_from_s3_equal_one(world):
    root, bucket, sections, endpoint = world
    fs, base = s3_filesystem(endpoint), f"s3://{bucket}"
    encoder, emb = f"{base}/cc-one", f"{base}/emb"
    if not fs.exists(f"{encoder}/manifest.json"):
        one_node(world, "caption_contrastive", {"data": f"{base}/data", "caption_encoder": encoder})
    local_encoder = root / "encoder"  # a KFP pod reads its inputs from the copies KFP's launcher made
    fs.get(f"{encoder}/", f"{local_encoder}/", recursive=True)
    cli(["embed_captions", "--common-json", json.dumps(sections["common"]), "--config-json",
         json.dumps(sections["embed_captions"]), "--data", f"{base}/data", "--caption-encoder",
         str(local_encoder), "--embeddings", emb], root, base_env(root / "tmp"))
    one, two = f"{base}/tv-one", f"{base}/tv-two"
    one_node(world, "train_vision", {"data": f"{base}/data", "embeddings": emb, "vision_model": one})

    uris = {"data": f"{base}/data", "embeddings": emb, "vision_model": two}
    nodes, latest = start_nodes(world, "train_vision", uris, "a"), f"{two}/checkpoints/latest"
    deadline = time.monotonic() + 600
    while all(p.poll() is None for p in nodes) and time.monotonic() < deadline and not fs.exists(latest):
        time.sleep(0.02)
        fs.invalidate_cache()
    for proc in nodes:  # the node pool is lost: every process of every node, at once
        for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            victim.send_signal(signal.SIGKILL)
    for proc in nodes:
        proc.communicate(timeout=60)
    fs.invalidate_cache()
    killed_at = int(fs.cat(latest).decode().strip().removeprefix("step"))
    assert 0 < killed_at < 8 and not fs.exists(f"{two}/manifest.json"), "killed after a commit, before the end"

    finish(start_nodes(world, "train_vision", uris, "b"))  # the Trainer restarts the job's pods
    fs.invalidate_cache()
    m2 = manifest(fs, two)
    assert m2["training"]["resumed_from"] >= killed_at and m2["training"]["steps"] == 8
    assert m2["training"]["world_size"] == manifest(fs, one)["training"]["world_size"] == 2
    assert_same_weights(fs, one, two)
    assert fs.exists(f"{two}/checkpoints/{m2['training']['checkpoint']}"), "the final checkpoint stays on S3"
