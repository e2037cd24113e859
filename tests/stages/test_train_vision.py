"""train_vision end to end on a tiny ViT: 2 gloo ranks with ZeRO 1/2/3, 2 "nodes" through the CLI
with MLflow, SIGKILL + resume == uninterrupted, the resumable data stream, the GPU script's dry run.

One prepared dataset (prepare_data) and one embeddings dir (sidecars written in the embed_captions
format from bag-of-words vectors, so captions that share words are near each other) serve the
whole module. Every training run is a torchrun subprocess: OMP_NUM_THREADS=1 makes the CPU runs
deterministic, so runs with the same config must end with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from llm2clip.config import (
    CommonConfig,
    PrepareDataConfig,
    SyntheticSource,
    TrainVisionConfig,
    ValidationConfig,
)
from llm2clip.data import sidecars
from llm2clip.io import StageError, sha256_file
from llm2clip.stages import STAGES, prepare_data
from llm2clip.stages import train_vision_io as vision_artifacts
from llm2clip.train import vision_data
from llm2clip.train.distributed import free_port
from llm2clip.vision.model import LOGIT_SCALE_MAX, LLM2CLIPModel

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DIM = 24
FINGERPRINT = "b" * 64
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 8}
STEPS = 12
TRAIN = {  # the run every test compares against; logit_scale starts above ln 100 to exercise the clamp
    "tower": "vit_scratch", "tower_config": TINY_VIT, "image_size": 32, "embed_dim": 16, "adapter_blocks": 2,
    "batch_size": 4, "max_steps": STEPS, "lr": 0.002, "warmup_steps": 2, "logit_scale_init": 4.7,
    "zero_stage": 1, "workers": 2, "shuffle_buffer": 16, "checkpoint_every": 3, "log_every": 4,
    "val_batch_size": 8,
}
RUNNER = """
import sys
from llm2clip.config import load_params
from llm2clip.stages import train_vision
from llm2clip.train.distributed import init_distributed

params, data, embeddings, out = sys.argv[1:5]
stages = [int(s) for s in sys.argv[5].split(",")] if len(sys.argv) > 5 else [None]
ctx = init_distributed()  # one process group for every run below (run() reuses it)
try:
    for stage in stages:
        p = load_params(params, [f"train_vision.zero_stage={stage}"] if stage is not None else [])
        target = f"{out}/zero{stage}" if stage is not None else out
        train_vision.run(p.train_vision, p.common, data=data, embeddings=embeddings, vision_model=target)
finally:
    ctx.shutdown()
"""


def bag_of_words(text: str) -> np.ndarray:
    """A fixed random vector per word, summed: shared words -> similar embeddings."""
    out = np.zeros(DIM)
    for word in text.lower().replace(",", " ").replace(".", " ").split():
        seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
        out += np.random.default_rng(seed).standard_normal(DIM)
    return out


def write_embeddings(data: Path, out: Path) -> dict:
    """Sidecars + manifest in the embed_captions format (what ``verify_sidecars`` accepts)."""
    manifest = json.loads((data / "manifest.json").read_text())
    identity = {"format_version": 1, "fingerprint": FINGERPRINT, "dtype": "float16", "normalized": False,
                "caption_fields": ["short", "dense"], "precision": "fp32"}
    markers = []
    for split, shards in manifest["shards"].items():
        for shard in shards:
            records = sidecars.read_shard_records(str(data / shard["name"]))
            arrays = [{f: np.stack([bag_of_words(c) for c in meta["captions"][f]]).astype(np.float16)
                       for f in ("short", "dense")} for _, meta in records]
            name = sidecars.sidecar_name(shard["name"])
            digest = sidecars.write_sidecar(out / name, [k for k, _ in records], arrays)
            markers.append({**identity, "image_shard": shard["name"], "image_sha256": shard["sha256"],
                            "split": split, "name": name, "sha256": digest, "count": len(records), "dim": DIM,
                            "stats": {"captions": sum(len(a[f]) for a in arrays for f in a)}})
    body = sidecars.build_manifest(identity, markers, {}, encoder={"path": "tiny-bag-of-words"})
    (out / "manifest.json").write_text(json.dumps(body))
    return body


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``(data, embeddings, root)``: 48 synthetic scenes (about 36 train / 12 val), 12 per shard."""
    root = tmp_path_factory.mktemp("train_vision")
    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=48, image_size=64),),
                            val_fraction=0.25, shard_size=12, image_max_side=48,
                            validation=ValidationConfig(min_valid_fraction=0.5))
    prepare_data.run(cfg, CommonConfig(tracking=False), data=str(root / "data"))
    write_embeddings(root / "data", root / "emb")
    return root / "data", root / "emb", root


def write_params(path: Path, tracking: str = "", **overrides) -> Path:
    common = {"tracking": bool(tracking), "tracking_uri": tracking}
    path.write_text(yaml.safe_dump({"common": common, "train_vision": TRAIN | overrides}))
    return path


def env() -> dict:
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLM2CLIP_LOG_LEVEL": "INFO",
            "TORCH_EXTENSIONS_DIR": extensions}


def stage_command(root: Path, params: Path, data: Path, emb: Path, out: Path) -> list[str]:
    """After the torchrun options: the CLI once the stage is registered, else run() via a script."""
    if "train_vision" in STAGES:
        return ["-m", "llm2clip", "train_vision", "--params", str(params), "--data", str(data),
                "--embeddings", str(emb), "--vision-model", str(out)]
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    return [str(runner), str(params), str(data), str(emb), str(out)]


def torchrun(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "torchrun"), *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(inputs):
    """The uninterrupted run: 2 "nodes" x 1 process (torchrun --nnodes 2), the CLI, MLflow on."""
    data, emb, root = inputs
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    params = write_params(root / "params-ref.yaml", tracking)
    out, port = root / "reference", free_port()
    command = stage_command(root, params, data, emb, out)
    nodes = [torchrun(["--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port",
                       str(port), "--nproc-per-node", "1", *command], cwd=root) for i in (0, 1)]
    logs = [finish(p) for p in nodes]
    return out, tracking, logs[0]


def test_reference_run_output_contract(inputs, reference):
    data, emb, _ = inputs
    out, _, log = reference
    for name in ("model.safetensors", "llm2clip_config.json", "metrics.json", "training_curve.png",
                 "manifest.json", "checkpoints/latest", "checkpoints/run.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints/latest").read_text().strip() == f"step{STEPS:08d}"
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    assert training["steps"] == STEPS and training["world_size"] == 2 and training["resumed_from"] == 0
    assert training["samples_seen"] == STEPS * 4 * 2 and training["zero_stage"] == 1
    assert manifest["inputs"]["embeddings"]["encoder_fingerprint"] == FINGERPRINT
    assert manifest["inputs"]["embeddings"]["caption_mix"] == {"short": 0.5, "dense": 0.5}
    assert len(manifest["config_hash"]) == 16 and manifest["inputs"]["data"]["train_samples"] > 0
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    assert 0 <= metrics["val_image_to_text_R_at_1"] <= 1 and metrics["val_short_pairs"] > 0
    assert metrics["final_logit_scale"] <= LOGIT_SCALE_MAX + 1e-6  # started at 4.7: clamped to ln 100
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    model = LLM2CLIPModel.from_pretrained(out)
    assert float(model.logit_scale.detach()) <= LOGIT_SCALE_MAX + 1e-6
    assert model.encode_text_embeddings(torch.randn(3, DIM)).shape == (3, 16)
    assert model.caption_encoder_fingerprint == FINGERPRINT
    assert "samples/s" in log or "samples_s" in log


def test_mlflow_has_params_and_step_metrics(reference):
    from mlflow.tracking import MlflowClient

    _, tracking, _ = reference
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("llm2clip").experiment_id],
                              filter_string="tags.`llm2clip.stage` = 'train_vision'")
    assert len(runs) == 1  # rank 0 only
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train_vision.zero_stage"] == "1"
    assert run.data.params["train_vision.derived.global_batch"] == "8"
    assert "llm2clip.input.embeddings.manifest_sha256" in run.data.tags
    for key in ("loss", "lr", "scale", "logit_scale", "i2t_acc", "t2i_acc", "samples_per_second",
                "samples_per_second_per_gpu", "data_time", "batch_time"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8, 12], key
    assert {"val_image_to_text_R_at_1", "val_dense_text_to_image_R_at_1"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curve.png", "metrics.json", "manifest.json", "llm2clip_config.json"} <= artifacts


def test_two_ranks_train_with_zero_1_2_3(inputs, reference):
    """The same run under ZeRO 1, 2 and 3 (one torchrun, 2 gloo ranks) ends with the same weights,
    and ZeRO-1 on one node equals the 2-node reference."""
    data, emb, root = inputs
    params = write_params(root / "params-zero.yaml")
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    finish(torchrun(["--standalone", "--nproc-per-node", "2", str(runner), str(params), str(data), str(emb),
                     str(root / "zero"), "1,2,3"], cwd=root))
    ref = weights(reference[0])
    for stage in (1, 2, 3):
        out = root / "zero" / f"zero{stage}"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["training"]["zero_stage"] == stage and manifest["training"]["world_size"] == 2
        # ZeRO-1/2 reduce gradients exactly like the reference; ZeRO-3 reduce-scatters them per
        # parameter partition, a different fp32 summation order, which Adam's normalised update
        # turns into differences of the order of lr for near-zero gradients.
        assert max_diff(weights(out), ref) <= (1e-6 if stage < 3 else 2e-3), stage
        assert float(weights(out)["logit_scale"]) <= LOGIT_SCALE_MAX + 1e-6


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(inputs, reference):
    data, emb, root = inputs
    params = write_params(root / "params-kill.yaml", checkpoint_every=2)  # not part of the run identity
    out = root / "killed"
    command = ["--standalone", "--nproc-per-node", "2", *stage_command(root, params, data, emb, out)]
    # niced, so this (mostly sleeping) poll loop wins the CPU the moment it wakes up
    proc = torchrun(command, cwd=root, preexec_fn=lambda: os.nice(10))
    latest, deadline = out / "checkpoints" / "latest", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and (
            not latest.is_file() or latest.read_text().strip() < "step00000004"):
        time.sleep(0.005)
    # SIGKILL torchrun, both ranks and their loader workers (torchrun puts each rank in its own
    # session, so the process tree, not the process group, is what a crash takes down)
    agent = psutil.Process(proc.pid)
    for victim in [*agent.children(recursive=True), agent]:
        victim.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    assert 0 < killed_at < STEPS and not (out / "manifest.json").exists()

    finish(torchrun(command, cwd=root))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["resumed_from"] >= killed_at and manifest["training"]["steps"] == STEPS
    assert max_diff(weights(out), weights(reference[0])) <= 1e-6
    ref_metrics = json.loads((reference[0] / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert math.isclose(got["final_loss"], ref_metrics["final_loss"], abs_tol=1e-6)
    assert not list((out / "checkpoints").glob("tmp-*"))


def _stream(inputs, start: int, total: int, workers: int):
    data, emb, _ = inputs
    manifest = json.loads((data / "manifest.json").read_text())
    model = LLM2CLIPModel.build({"kind": "vit_scratch", "config": TINY_VIT, "image_size": 32}, llm_dim=DIM,
                                embed_dim=8, adapter_blocks=1)
    stream = vision_data.TrainStream(
        vision_data.shard_pairs(str(data), str(emb), "train", manifest), model.train_transform(),
        batch_size=3, fields=("short", "dense"), weights=(0.5, 0.5), seed=7, rank=1, workers=workers,
        start=start, total=total, shuffle_buffer=8)
    return list(vision_data.make_loader(stream, workers))


def test_data_stream_resumes_exactly_with_worker_rotation(inputs):
    full = _stream(inputs, 0, 7, workers=2)
    tail = _stream(inputs, 3, 7, workers=2)  # resume at micro-batch 3: worker 0 plays stream 1
    assert len(full) == 7 and len(tail) == 4
    for a, b in zip(full[3:], tail, strict=True):
        assert a["keys"] == b["keys"] and a["fields"] == b["fields"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["text"], b["text"])
    assert full[0]["pixels"].shape == (3, 3, 32, 32) and full[0]["text"].shape == (3, DIM)
    assert full[0]["text"].dtype == torch.float32
    in_process = _stream(inputs, 0, 3, workers=0)  # no workers = the single stream of workers=1
    one_worker = _stream(inputs, 0, 3, workers=1)
    assert [b["keys"] for b in in_process] == [b["keys"] for b in one_worker]
    assert [b["keys"] for b in full[:2]] != [b["keys"] for b in in_process[:2]]  # streams differ
    fields = [f for b in full for f in b["fields"]]
    assert {"short", "dense"} == set(fields)


def test_misaligned_sidecar_and_unknown_caption_field_are_refused(inputs, tmp_path):
    data, emb, _ = inputs
    manifest = json.loads((data / "manifest.json").read_text())
    first = manifest["shards"]["train"][0]["name"]
    keys_arrays = list(sidecars.read_sidecar(str(emb / sidecars.sidecar_name(first))))
    swapped = keys_arrays[1:2] + keys_arrays[:1] + keys_arrays[2:]
    sidecars.write_sidecar(tmp_path / sidecars.sidecar_name(first), [k for k, _ in swapped],
                           [a for _, a in swapped])
    pair = vision_data.ShardPair(str(data / first), str(tmp_path / sidecars.sidecar_name(first)), 12)
    stream = vision_data.TrainStream([pair], lambda image, rng: np.zeros((3, 4, 4), np.float32), batch_size=2,
                                     fields=("short",), weights=(1.0,), seed=0, rank=0, workers=0, start=0,
                                     total=2, shuffle_buffer=0)
    with pytest.raises(StageError, match="not aligned"):
        list(stream)
    cfg = TrainVisionConfig(caption_mix={"long": 1.0})
    with pytest.raises(StageError, match="caption_mix"):
        vision_artifacts.check_inputs(cfg, CommonConfig(tracking=False), str(data), str(emb))


def test_gpu_benchmark_script_dry_run_on_cpu():
    """bench/gpu_train_vision.sh runs the same trainer; --dry-run is its CPU check (no GPU here)."""
    done = subprocess.run(["bash", str(REPO / "bench/gpu_train_vision.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env=env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert report["samples_per_second"] > 0 and 0 < report["mfu"] < 1 and report["steps"] == 4


TWICE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench.gpu_train_vision import main
runs = [main(["--dry-run", "--zero-stage", "2"]) for _ in range(2)]  # each: its own group, then shutdown
print("RESULTS " + json.dumps(runs))
"""


def test_gpu_benchmark_script_dry_run_twice_in_one_process():
    """bench/gpu_train_vision.py's CPU check (no GPU here), run twice in one process: a process
    group destroyed and created again must not leave DeepSpeed's cached sub-groups behind (they
    made the second engine fail with "Group ... is not registered")."""
    done = subprocess.run([sys.executable, "-c", TWICE, str(REPO)], capture_output=True, text=True, timeout=300,
                          env=env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULTS "))[8:])
    for report in (first, second):
        assert report["samples_per_second"] > 0 and report["model_gflop_per_sample"] > 0
        assert 0 < report["mfu"] < 1 and report["steps"] == 4 and report["peer_samples_per_second"] > 0
    assert first["final_loss"] == second["final_loss"]  # the same seeded run, twice
    assert "MFU" in done.stdout and "samples/s" in done.stdout


def test_siglip_loss_trains_a_bias_and_is_recorded(inputs):
    """``loss: siglip`` (2 gloo ranks, the ring exchange): the model gets a learnable bias that
    starts at SigLIP's -10 and moves, the loss falls, the exported config names the loss, and
    the model loads back with it; checkpoints are removed with ``keep_checkpoints: 0``."""
    from llm2clip.losses import SigLipLoss

    data, emb, root = inputs
    params = write_params(root / "params-siglip.yaml", loss="siglip", logit_scale_init=None, keep_checkpoints=0,
                          checkpoint_every=4)
    out = root / "siglip"
    finish(torchrun(["--standalone", "--nproc-per-node", "2", *stage_command(root, params, data, emb, out)],
                    cwd=root))
    config = json.loads((out / "llm2clip_config.json").read_text())
    assert config["loss"] == "siglip"
    assert config["logit_bias"] != SigLipLoss.init_logit_bias and abs(config["logit_bias"] + 10) < 1
    manifest = json.loads((out / "manifest.json").read_text())
    losses = manifest["training"]["losses"]
    assert losses[-1] < losses[0], losses
    assert manifest["training"]["checkpoint"] is None and not (out / "checkpoints").exists()
    model = LLM2CLIPModel.from_pretrained(out)
    assert model.loss == "siglip" and float(model.logit_bias) == pytest.approx(config["logit_bias"])
    assert "logit_bias" in weights(out)


def test_a_full_disk_at_the_first_checkpoint_is_one_clear_error(inputs, reference, tmp_path):
    """The vision model's folder on a tmpfs with room for half a checkpoint: the run stops with exit
    2 and one ERROR line about space; no ``latest`` (nothing to resume from that looks complete),
    no model, no manifest."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tmpfs import tmpfs

    data, emb, root = inputs
    step = (reference[0] / "checkpoints" / "latest").read_text().strip()
    size = sum(p.stat().st_size for p in (reference[0] / "checkpoints" / step).rglob("*") if p.is_file())
    params = write_params(root / "params-full.yaml")
    with tmpfs(tmp_path / "small", f"{max(64, size // 2 // 1024)}k") as small:
        done = subprocess.run([sys.executable, "-m", "llm2clip", "train_vision", "--params", str(params), "--data",
                               str(data), "--embeddings", str(emb), "--vision-model", str(small / "out")],
                              cwd=root, env=env(), capture_output=True, text=True, timeout=600)
        left = {p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file()}
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "space" in errors[0].lower(), errors
    assert not {"out/checkpoints/latest", "out/model.safetensors", "out/manifest.json"} & left
