"""Embedding sidecars: format, lockstep reading with key checks, done-markers, verification."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm2clip.data import sidecars
from llm2clip.io import StageError, sha256_file

_spec = importlib.util.spec_from_file_location(
    "sidecar_tiny_assets", Path(__file__).resolve().parent / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

DIM = 8
FP = "f" * 64
IDENTITY = {"format_version": 1, "fingerprint": FP, "dtype": "float16", "normalized": True,
            "caption_fields": ["short", "dense"], "precision": "fp32"}


def keys_of(shard: Path) -> list[str]:
    with open(shard, "rb") as f:
        return [k for k, _ in sidecars.iter_groups(f)]


def vectors_for(key: str, k: int = 1) -> np.ndarray:
    rng = np.random.default_rng(int(key))
    return rng.standard_normal((k, DIM)).astype(np.float16)


def make_embeddings(data: Path, out: Path, order=lambda keys: keys) -> dict:
    """Sidecars for every shard of a tiny data dir (random vectors) + a manifest; returns it."""
    manifest = json.loads((data / "manifest.json").read_text())
    markers = []
    for split, shards in manifest["shards"].items():
        for shard in shards:
            keys = order(keys_of(data / shard["name"]))
            arrays = [{"short": vectors_for(k), "dense": vectors_for(k, 2)} for k in keys]
            digest = sidecars.write_sidecar(out / sidecars.sidecar_name(shard["name"]), keys, arrays)
            markers.append({**IDENTITY, "image_shard": shard["name"], "image_sha256": shard["sha256"],
                            "split": split, "name": sidecars.sidecar_name(shard["name"]),
                            "sha256": digest, "count": len(keys), "dim": DIM,
                            "stats": {"captions": 3 * len(keys)}})
            sidecars.write_marker(out, shard["name"], markers[-1])
    body = sidecars.build_manifest(IDENTITY, markers, {})
    (out / "manifest.json").write_text(json.dumps(body))
    return body


@pytest.fixture()
def data(tmp_path) -> Path:
    root = tiny_assets.write_shards(tmp_path / "data", n_train=12, n_val=5, per_shard=5)
    m = json.loads((root / "manifest.json").read_text())
    m |= {"format_version": 1}  # the tiny writer predates format_version; load_manifest wants it
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_names():
    assert sidecars.sidecar_name("train-000003.tar") == "train-000003_text_embeddings.tar"
    assert sidecars.marker_name("val-000000.tar") == "val-000000_text_embeddings.json"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_shapes_dtypes_and_determinism(tmp_path, dtype):
    keys = ["a-1", "a-2", "b-0"]
    arrays = [{"short": np.ones((k, DIM), dtype), "dense": np.zeros((1, DIM), dtype)} for k in (1, 2, 0)]
    first = sidecars.write_sidecar(tmp_path / "x_text_embeddings.tar", keys, arrays)
    again = sidecars.write_sidecar(tmp_path / "y_text_embeddings.tar", keys, arrays)
    assert first == again  # byte-identical for the same input
    got = list(sidecars.read_sidecar(str(tmp_path / "x_text_embeddings.tar")))
    assert [k for k, _ in got] == keys
    assert [v["short"].shape for _, v in got] == [(1, DIM), (2, DIM), (0, DIM)]
    assert all(v["short"].dtype == np.dtype(dtype) for _, v in got)
    assert not list(tmp_path.glob(".*tmp*"))


def test_plain_webdataset_reads_a_sidecar(tmp_path):
    import webdataset as wds

    arrays = [{"short": np.full((1, DIM), i, np.float16)} for i in range(3)]
    sidecars.write_sidecar(tmp_path / "s_text_embeddings.tar", ["k0", "k1", "k2"], arrays)
    samples = list(wds.WebDataset(str(tmp_path / "s_text_embeddings.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert samples[2]["short.npy"].shape == (1, DIM) and samples[2]["short.npy"][0, 0] == 2


def test_lockstep_yields_pairs_and_checks_every_key(data, tmp_path):
    out = tmp_path / "emb"
    make_embeddings(data, out)
    pairs = list(sidecars.iter_lockstep(str(data), str(out), "train", decode=False))
    assert len(pairs) == 12
    for sample, arrays in pairs:
        assert arrays["dense"].shape == (2, DIM)
        np.testing.assert_array_equal(arrays["short"], vectors_for(sample.key))
        assert sample.captions["short"]

    shutil.rmtree(out)
    make_embeddings(data, out, order=lambda keys: keys[1:] + keys[:1])
    with pytest.raises(StageError, match=r"sample 0 has key .* out of order.*dvc repro embed_captions"):
        list(sidecars.iter_lockstep(str(data), str(out), "train", decode=False))
    shutil.rmtree(out)
    make_embeddings(data, out, order=lambda keys: keys[:-1])
    with pytest.raises(StageError, match="fewer samples"):
        list(sidecars.iter_lockstep(str(data), str(out), "val", decode=False))


def test_verify_accepts_aligned_sidecars(data, tmp_path):
    body = make_embeddings(data, tmp_path / "emb")
    assert sidecars.verify_sidecars(str(data), str(tmp_path / "emb"), FP) == body


@pytest.mark.parametrize("change", ["order", "key", "count"])
def test_verify_refuses_misaligned_keys(data, tmp_path, change):
    out = tmp_path / "emb"
    edit = {"order": lambda k: [k[1], k[0], *k[2:]], "key": lambda k: [*k[:-1], "99999999"],
            "count": lambda k: k[:-1]}[change]
    body = make_embeddings(data, out)
    # rewrite one sidecar behind the manifest's back (what a buggy tool or a bad copy would do)
    shard = "train-000001.tar"
    keys = edit(keys_of(data / shard))
    arrays = [{"short": vectors_for("1")}] * len(keys)
    sidecars.write_sidecar(out / sidecars.sidecar_name(shard), keys, arrays)
    expected = {"order": r"sample 0 has key '00000006' but train-000001.tar has '00000005'",
                "key": r"sample 4 has key '99999999'", "count": "fewer samples"}[change]
    with pytest.raises(StageError, match=expected + r".*re-run `dvc repro embed_captions`"):
        sidecars.verify_sidecars(str(data), str(out))
    # without the key check the changed bytes still give it away
    with pytest.raises(StageError, match="sha256 differs from the embeddings manifest"):
        sidecars.verify_sidecars(str(data), str(out), check_keys=False)
    assert body["counts"]["shards"] == 4


def test_verify_refuses_another_encoder_and_changed_data(data, tmp_path):
    out = tmp_path / "emb"
    make_embeddings(data, out)
    other = "0" * 64
    with pytest.raises(StageError) as err:
        sidecars.verify_sidecars(str(data), str(out), expected_fingerprint=other)
    assert str(err.value) == (f"embeddings were made with encoder {FP} but caption_encoder is {other}: "
                              f"{sidecars.RERUN}")

    m = json.loads((data / "manifest.json").read_text())
    sha, m["shards"]["val"][0]["sha256"] = m["shards"]["val"][0]["sha256"], "1" * 64
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StageError, match=r"aligned to image shard sha256 .* changed after embed_captions"):
        sidecars.verify_sidecars(str(data), str(out))

    m["shards"]["val"][0]["sha256"] = sha
    m["shards"]["val"].append({"name": "val-000009.tar", "count": 1, "sha256": "2" * 64})
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StageError, match="no embedding sidecar for image shard val-000009.tar"):
        sidecars.verify_sidecars(str(data), str(out), check_files=False, check_keys=False)


def test_verify_refuses_unfinished_output(data, tmp_path):
    (tmp_path / "emb").mkdir()
    with pytest.raises(StageError, match=r"manifest.json not found.*dvc repro embed_captions"):
        sidecars.verify_sidecars(str(data), str(tmp_path / "emb"))


def test_done_markers_and_clean_output(data, tmp_path):
    out = tmp_path / "emb"
    make_embeddings(data, out)
    shard = "train-000000.tar"
    sha = json.loads((data / "manifest.json").read_text())["shards"]["train"][0]["sha256"]
    want = {**IDENTITY, "image_sha256": sha}
    made = sha256_file(out / sidecars.sidecar_name(shard))
    assert sidecars.marker_matches(out, shard, want)["sha256"] == made
    assert sidecars.marker_matches(out, shard, {**want, "dtype": "float32"}) is None  # made differently
    assert sidecars.marker_matches(out, shard, {**want, "image_sha256": "x"}) is None  # data changed
    with open(out / sidecars.sidecar_name(shard), "ab") as f:  # tampered / truncated file
        f.write(b"\0" * 512)
    assert sidecars.marker_matches(out, shard, want) is None
    (out / sidecars.marker_name("val-000000.tar")).unlink()  # killed between rename and marker
    assert sidecars.marker_matches(out, "val-000000.tar", want) is None

    (out / ".train-000001_text_embeddings.tar.tmp-abc").write_bytes(b"half")
    (out / "train-000042_text_embeddings.tar").write_bytes(b"old")
    (out / "notes.txt").write_text("not ours")
    removed = sidecars.clean_output(out, {"train-000000.tar", "train-000001.tar"})
    assert removed[0] == "manifest.json"
    assert {".train-000001_text_embeddings.tar.tmp-abc", "train-000042_text_embeddings.tar",
            "val-000000_text_embeddings.tar"} <= set(removed)
    assert (out / "train-000001_text_embeddings.tar").is_file() and (out / "notes.txt").is_file()


def test_read_shard_records_checks_the_image_shard(data):
    records = sidecars.read_shard_records(str(data / "val-000000.tar"))
    assert [k for k, _ in records] == keys_of(data / "val-000000.tar")
    assert records[0][1]["captions"]["short"]
    with pytest.raises(StageError, match="sha256 differs from the data manifest"):
        sidecars.read_shard_records(str(data / "val-000000.tar"), expected_sha256="0" * 64)
