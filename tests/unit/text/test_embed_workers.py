"""embed_captions across worker processes: which worker gets which device and which shards (pure
functions, fake GPU counts), and the output of 1 and 2 workers is byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_assets import SHAPES, make_llama, scene

from llm2clip.config import CommonConfig, EmbedCaptionsConfig
from llm2clip.config.base import ConfigError
from llm2clip.io import StageError
from llm2clip.stages import embed_captions
from llm2clip.text.embed import WorkerSlot, assign_work, resolve_workers, worker_slots
from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

COMMON = CommonConfig(tracking=False)


# ------------------------------------------------------------------------------- devices


@pytest.mark.parametrize(("asked", "device", "gpus", "workers"), [
    (0, "cuda", 8, 8),   # auto: one per visible GPU
    (0, "cuda", 2, 2),   # e.g. CUDA_VISIBLE_DEVICES=4,6 on an 8-GPU node: torch counts 2
    (0, "cuda", 1, 1),
    (0, "cpu", 0, 1),    # auto on CPU: one process whose threads take every core (as before)
    (3, "cpu", 0, 3),
    (1, "cuda", 8, 1),   # asked for: kept
    (12, "cuda", 4, 12),
])
def test_resolve_workers(asked, device, gpus, workers):
    assert resolve_workers(asked, device, gpus) == workers


def test_resolve_workers_refuses_cuda_without_a_visible_gpu():
    for asked in (0, 2):
        with pytest.raises(StageError, match=r"device is cuda but this process sees no CUDA device "
                                             r"\(CUDA_VISIBLE_DEVICES=\); set embed_captions.device: cpu"):
            resolve_workers(asked, "cuda", 0, "")
    with pytest.raises(StageError, match=r"\(CUDA_VISIBLE_DEVICES=<unset>\)"):
        resolve_workers(0, "cuda", 0)
    with pytest.raises(StageError, match="num_workers: must be >= 0"):
        resolve_workers(-1, "cpu", 0)


def test_one_worker_per_gpu_named_by_cuda_visible_devices():
    assert worker_slots(4, "cuda", 4) == [WorkerSlot(w, f"cuda:{w}", str(w)) for w in range(4)]
    # CUDA_VISIBLE_DEVICES=4,6: the process sees 2 GPUs as cuda:0 and cuda:1 = physical 4 and 6
    slots = worker_slots(2, "cuda", 2, "4,6")
    assert slots == [WorkerSlot(0, "cuda:0", "4"), WorkerSlot(1, "cuda:1", "6")]
    assert [s.describe() for s in slots] == ["cuda:0 (GPU 4)", "cuda:1 (GPU 6)"]
    uuids = "GPU-8f2c, GPU-1a0b"
    assert [s.gpu for s in worker_slots(2, "cuda", 2, uuids)] == ["GPU-8f2c", "GPU-1a0b"]
    # fewer visible than listed (an invalid entry ends CUDA's list): only the first ones are named
    assert [s.gpu for s in worker_slots(1, "cuda", 1, "3,99")] == ["3"]


def test_more_workers_than_gpus_only_when_asked_round_robin():
    assert [s.device for s in worker_slots(5, "cuda", 2)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [s.device for s in worker_slots(resolve_workers(0, "cuda", 3), "cuda", 3)] == \
        ["cuda:0", "cuda:1", "cuda:2"]  # auto never puts two workers on one GPU
    assert worker_slots(2, "cpu", 0) == [WorkerSlot(0, "cpu"), WorkerSlot(1, "cpu")]
    assert worker_slots(2, "cpu", 0)[0].describe() == "cpu"


def test_config_num_workers_zero_is_auto_and_negative_is_refused():
    assert EmbedCaptionsConfig().num_workers == 0
    with pytest.raises(ConfigError, match=r"embed_captions.num_workers: must be >= 0, got -1"):
        EmbedCaptionsConfig(num_workers=-1)


# ------------------------------------------------------------------------------- shards


def flat(parts):
    return sorted(i for idx, _ in parts for i in idx)


def test_equal_shards_go_round_robin():
    parts = assign_work([100] * 7, 3)
    assert parts == [([0, 3, 6], False), ([1, 4], False), ([2, 5], False)]


def test_longest_first_to_the_least_loaded_worker():
    # by cost: 50 (shard 0) -> w0; 40 (2) -> w1; the texts (35) -> w1 (load 40 < 50); 30 (3) -> w0
    # (50 < 75); 30 (4) -> w1 (75 < 80); 10 (1) -> w0 (80 < 105). Loads 90 and 105.
    parts = assign_work([50, 10, 40, 30, 30], 2, texts=35)
    assert parts == [([0, 3, 1], False), ([2, 4], True)]
    # cost = samples x fields: 2 fields double every shard, not the texts: 100 -> w0, 80 -> w1,
    # 60 (3) -> w1, 60 (4) -> w0, texts 35 -> w1 (140 < 160), 20 (1) -> w0 (160 < 175)
    assert assign_work([50, 10, 40, 30, 30], 2, texts=35, fields=2) == [([0, 4, 1], False), ([2, 3], True)]


def test_assignment_is_a_pure_function_of_sizes_and_workers():
    rng = np.random.default_rng(0)
    for workers in (1, 2, 3, 8):
        counts = rng.integers(1, 1000, size=40).tolist()
        parts = assign_work(counts, workers, texts=300, fields=2)
        assert parts == assign_work(list(counts), workers, texts=300, fields=2)  # same answer each time
        assert flat(parts) == list(range(40)) and sum(t for _, t in parts) == 1  # every shard once
        assert len(parts) == workers
    assert assign_work([], 2, texts=10) == [([], True), ([], False)]
    assert assign_work([3], 4) == [([0], False), ([], False), ([], False), ([], False)]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        assign_work([1], 0)


# ------------------------------------------------------------------------------- 1 vs 2 workers


def write_labelled_shards(root: Path, sizes: dict[str, list[int]]) -> Path:
    """prepare_data-style shards with a ``label`` per sample (so there is a zero-shot set)."""
    root.mkdir(parents=True)
    shards: dict[str, list[dict]] = {}
    index = 0
    for split, counts in sizes.items():
        shards[split] = []
        for number, count in enumerate(counts):
            name = f"{split}-{number:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for _ in range(count):
                    short, dense = scene(index)
                    meta = {"key": f"{index:08d}", "captions": {"short": [short], "dense": [dense]},
                            "label": SHAPES[(index // 6) % 10], "source": "tiny"}
                    for ext, data in (("jpg", b"\xff\xd8\xff\xd9"), ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{index:08d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    index += 1
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            shards[split].append({"name": name, "count": count, "sha256": digest})
    (root / "manifest.json").write_text(json.dumps({
        "stage": "prepare_data", "format_version": 1, "caption_fields": ["short", "dense"], "shards": shards}))
    return root


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    root = make_llama(tmp_path_factory.mktemp("encoder"), causal_lm=False)
    settings = EncoderSettings(prompt_template="[INST] {text} [/INST]", padding_side="left")
    (root / SETTINGS_FILE).write_text(json.dumps(settings.to_dict()))
    return str(root)


def test_one_and_two_workers_write_byte_identical_sidecars(tiny_encoder, tmp_path):
    data = write_labelled_shards(tmp_path / "data", {"train": [20, 20, 8], "val": [16]})
    # the same torch thread count per process for both runs: on CPU it decides the summation order
    cfg = EmbedCaptionsConfig(threads=1, device="cpu", zeroshot_templates=("a photo of {}.", "a {}"))
    threads = torch.get_num_threads()
    try:
        results = {w: embed_captions.run(replace(cfg, num_workers=w), COMMON, data=str(data),
                                         caption_encoder=tiny_encoder, embeddings=str(tmp_path / f"w{w}"))
                   for w in (1, 2)}
    finally:
        torch.set_num_threads(threads)
    one, two = tmp_path / "w1", tmp_path / "w2"
    # 4 shards + the prompts: worker 0 gets train-0 (40 captions) and val (32), worker 1 the rest
    assert assign_work([20, 20, 8, 16], 2, texts=20, fields=2) == [([0, 3], False), ([1, 2], True)]
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert sum(f.endswith("_text_embeddings.tar") for f in files) == 4 and "zeroshot/val.npy" in files
    for name in files:
        if name.endswith(("_text_embeddings.tar", ".npy")):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    # the config hash covers num_workers itself (it is the config's provenance); nothing else differs
    assert manifests[0].pop("config_hash") != manifests[1].pop("config_hash")
    assert manifests[0] == manifests[1]
    for marker in (p.name for p in one.glob("*_text_embeddings.json")):
        a, b = (json.loads((d / marker).read_text()) for d in (one, two))
        assert a["stats"].pop("seconds") >= 0 and b["stats"].pop("seconds") >= 0  # timings differ
        assert a == b
    assert results[1].captions == results[2].captions == 2 * 64
    assert results[1].fingerprint == results[2].fingerprint


def test_a_worker_error_reaches_the_caller_as_is(tiny_encoder, tmp_path):
    from llm2clip.text.embed import EmbedOptions, ShardJob, run_jobs

    data = write_labelled_shards(tmp_path / "data", {"train": [4, 4]})
    manifest = json.loads((data / "manifest.json").read_text())
    jobs = [ShardJob("train", e["name"], str(data / e["name"]), e["sha256"], e["count"])
            for e in manifest["shards"]["train"]]
    jobs[1] = replace(jobs[1], sha256="0" * 64)  # worker 1's shard no longer matches the manifest
    opts = EmbedOptions(encoder=tiny_encoder, out=str(tmp_path / "out"), caption_fields=("short", "dense"))
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match=r"train-000001.tar: sha256 differs from the data manifest"):
        run_jobs(jobs, opts, num_workers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_workers_auto_one_per_gpu_and_the_same_bytes(tiny_encoder, tmp_path):
    """auto = one worker per visible GPU; 2 workers (on one GPU: asked for, they share it) write the
    same bytes as 1 (identical GPUs run the same kernels on the same batches)."""
    data = write_labelled_shards(tmp_path / "data", {"train": [8, 8, 8], "val": [8]})
    cfg = EmbedCaptionsConfig(device="cuda", precision="bf16", zeroshot_templates=("a photo of {}.",))
    outs = {}
    for workers in (0, 1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        embed_captions.run(replace(cfg, num_workers=workers), COMMON, data=str(data), caption_encoder=tiny_encoder,
                           embeddings=str(outs[workers]))
    assert resolve_workers(0, "cuda", torch.cuda.device_count()) == torch.cuda.device_count()
    names = sorted(p.name for p in outs[1].glob("*_text_embeddings.tar")) + ["zeroshot/val.npy"]
    for workers in (0, 2):
        for name in names:
            assert (outs[1] / name).read_bytes() == (outs[workers] / name).read_bytes(), (workers, name)


def test_gpu_embed_script_dry_run_on_cpu():
    """bench/gpu_embed.py's CPU check (tiny Llama): every method runs on the same batches and the
    packed vectors agree with the padded transformers forward."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from bench.gpu_embed import main

    threads = torch.get_num_threads()
    try:
        report = main(["--dry-run", "--captions", "12", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [s["set"] for s in report["sets"]] == ["demo", "long"]
    for s in report["sets"]:
        assert s["captions"] == 12 and s["real_tokens"] > 12
        assert set(s["methods"]) == {"packed", "padded", "padded, own batches", "embed_texts (stage function)"}
        assert s["linear_tokens"]["packed"] == s["real_tokens"] <= s["linear_tokens"]["padded"]
        assert s["cosine_min"] > 0.99  # bf16
