"""prepare_data end to end: output contract, quarantine, duplicates, determinism, crash + rerun,
S3 in and out, the stage gate, and the CLI with MLflow tracking."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip.config import (
    CommonConfig,
    EmojiSource,
    ManifestSource,
    PrepareDataConfig,
    SyntheticSource,
    ValidationConfig,
    WebDatasetSource,
)
from llm2clip.data.collect import split_of
from llm2clip.data.records import make_key
from llm2clip.data.shards import ShardWriter, iter_samples, load_manifest, verify_shards
from llm2clip.io import StageError
from llm2clip.stages import prepare_data

REPO = Path(__file__).resolve().parents[2]
COMMON = CommonConfig(tracking=False, seed=0)
SCENES = SyntheticSource(name="scenes", count=24, image_size=64)
JSON_FIELDS = {"key", "captions", "source", "source_id", "width", "height", "label"}


def small(*sources, **kw) -> PrepareDataConfig:
    kw.setdefault("validation", ValidationConfig(min_valid_fraction=0.5))
    return PrepareDataConfig(
        sources=sources or (SCENES, EmojiSource(name="emoji", count=8, image_size=64)),
        val_fraction=0.3,
        shard_size=10,
        image_max_side=48,
        **kw,
    )


def shard_sums(directory: Path) -> dict[str, str]:
    m = json.loads((directory / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for split in m["shards"].values() for s in split}


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def noise(seed: int, w: int = 80, h: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def write_manifest(folder: Path, rows: list[tuple[str, bytes | None, object, object]]) -> ManifestSource:
    """JSONL manifest: (id, image bytes or None = missing file, short, dense) per row."""
    lines = []
    for key, data, short, dense in rows:
        if data is not None:
            (folder / f"{key}.img").write_bytes(data)
        lines.append(json.dumps({"id": key, "file": f"{key}.img", "s": short, "d": dense}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return ManifestSource(
        name="m",
        path=str(folder / "m.jsonl"),
        image_column="file",
        key_column="id",
        caption_columns={"short": "s", "dense": "d"},
    )


def test_output_contract(tmp_path):
    out = tmp_path / "data"
    result = prepare_data.run(small(), COMMON, data=str(out))
    manifest = load_manifest(str(out), caption_fields=COMMON.caption_fields)
    c = manifest["counts"]
    assert result.summary()["train"] == c["train"] and c["train"] + c["val"] == c["seen"] == 32
    assert manifest["config_hash"] == result.config_hash and manifest["caption_fields"] == ["short", "dense"]
    assert {s["name"] for s in manifest["shards"]["train"]} >= {"train-000000.tar", "train-000001.tar"}
    verify_shards(str(out), manifest)
    for split in ("train", "val"):
        samples = list(iter_samples(str(out), split, manifest=manifest))
        assert len(samples) == c[split] == sum(s["count"] for s in manifest["shards"][split])
        for s in samples:
            assert set(s.meta) == JSON_FIELDS and s.key == s.meta["key"] and "." not in s.key
            assert set(s.captions) == {"short", "dense"} and all(len(v) >= 1 for v in s.captions.values())
            assert (
                s.image.mode == "RGB"
                and max(s.image.size) <= 48
                and s.image.size == (s.meta["width"], s.meta["height"])
            )
            assert s.label
    validation = out / "validation"
    assert json.loads((validation / "expectations.json").read_text())["success"] is True
    assert (validation / "data_docs" / "index.html").is_file() and (validation / "preview.jpg").is_file()
    assert list((validation / "data_docs" / "validations").rglob("*.html"))
    assert (out / "quarantine.jsonl").read_text() == ""
    assert manifest["labels"]["scenes"] and manifest["validation"]["evaluated"] > 10


def test_bad_inputs_are_quarantined_with_reasons_and_good_ones_kept(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 2] = rgba[..., 3] = 255
    good = encode(noise(1), "JPEG")
    rows = [
        ("ok1", good, "a noisy picture", "random coloured noise"),
        ("ok2", encode(noise(2), "PNG"), ["one", "two captions"], "more noise"),
        (
            "png16",
            encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG"),
            "grey square",
            "a grey one",
        ),
        ("cmyk", encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), "red square", "a red one"),
        ("rgba", encode(Image.fromarray(rgba, "RGBA"), "PNG"), "blue square", "a blue one"),
        ("trunc", good[: len(good) // 2], "cut", "a cut file"),
        ("text", b"hello, not an image" * 5, "text", "a text file"),
        ("tiny", encode(noise(3, 8, 8), "PNG"), "tiny", "a tiny one"),
        ("wide", encode(noise(4, 400, 40), "PNG"), "wide", "a wide one"),
        ("bomb", bomb_png(), "bomb", "a bomb"),
        ("nocap", encode(noise(5), "PNG"), "fine", "   \u200b "),
        ("gone", None, "missing", "a missing file"),
        ("long", encode(noise(6), "PNG"), "word " * 700, "unicode \ufb01ne\x00 junk"),
    ]
    src = write_manifest(tmp_path, rows)
    out = tmp_path / "data"
    prepare_data.run(small(src, validation=ValidationConfig(min_valid_fraction=0.3)), COMMON, data=str(out))
    reasons = {
        q["key"]: q["reason"] for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())
    }
    assert reasons == {
        "m-trunc": "truncated_image",
        "m-text": "not_an_image",
        "m-tiny": "image_too_small",
        "m-wide": "bad_aspect_ratio",
        "m-bomb": "decompression_bomb",
        "m-nocap": "missing_caption",
        "m-gone": "missing_image",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {s.key: s for split in ("train", "val") for s in iter_samples(str(out), split, manifest=manifest)}
    assert set(kept) == {"m-ok1", "m-ok2", "m-png16", "m-cmyk", "m-rgba", "m-long"}
    assert kept["m-ok2"].captions["short"] == ["one", "two captions"]
    assert (
        kept["m-long"].captions["dense"] == ["unicode fine junk"]
        and len(kept["m-long"].captions["short"][0]) <= 2000
    )
    assert (
        np.asarray(kept["m-cmyk"].image)[20, 20, 0] > 200
        and np.asarray(kept["m-rgba"].image)[20, 20, 2] > 200
    )
    assert abs(int(np.asarray(kept["m-png16"].image)[20, 20, 0]) - 40000 // 257) <= 3
    c = manifest["counts"]
    assert (
        c["captions_truncated"] == 1 and c["per_reason"]["decompression_bomb"] == 1 and c["quarantined"] == 7
    )


def test_duplicates_across_splits_end_in_one_split(tmp_path):
    ids = [f"d{i}" for i in range(60)]
    val_ids = [i for i in ids if split_of(make_key("m", i), 0.3) == "val"]
    train_ids = [i for i in ids if split_of(make_key("m", i), 0.3) == "train"]
    anchor = min(val_ids[0], train_ids[0], train_ids[1])  # the group follows the smallest key
    same = encode(noise(9), "PNG")
    rows = [
        (val_ids[0], same, "a cat", "a cat, drawn as noise"),
        (train_ids[0], same, "a dog", "the same noise, called a dog"),
        (train_ids[1], same, "a cat", "a cat, drawn as noise"),
    ]  # exact copy of the first row
    rows += [
        (i, encode(noise(20 + n), "PNG"), "other picture", "another noise picture")
        for n, i in enumerate(train_ids[2:5] + val_ids[1:3])
    ]
    out = tmp_path / "data"
    prepare_data.run(small(write_manifest(tmp_path, rows)), COMMON, data=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    where = {
        s.key: split for split in ("train", "val") for s in iter_samples(str(out), split, manifest=manifest)
    }
    expected = split_of(make_key("m", anchor), 0.3)
    kept_copies = {make_key("m", i) for i in (val_ids[0], train_ids[0], train_ids[1])} & set(where)
    assert len(kept_copies) == 2 and {where[k] for k in kept_copies} == {expected}
    (dup,) = map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())
    assert dup["reason"] == "duplicate" and dup["key"] == make_key("m", max(val_ids[0], train_ids[1]))
    assert manifest["counts"]["shared_images"] == 1 and manifest["counts"]["valid_fraction"] == 1.0


def test_two_runs_give_byte_identical_shards_and_manifest(tmp_path):
    prepare_data.run(small(), COMMON, data=str(tmp_path / "a"))
    prepare_data.run(small(), COMMON, data=str(tmp_path / "b"))
    assert shard_sums(tmp_path / "a") == shard_sums(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    prepare_data.run(small(), replace(COMMON, seed=1), data=str(tmp_path / "c"))
    assert shard_sums(tmp_path / "c") != shard_sums(tmp_path / "a")


def test_crash_mid_run_then_rerun_gives_a_complete_output(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    prepare_data.run(small(), COMMON, data=str(reference))
    out, calls, original = tmp_path / "data", [0], ShardWriter.write

    def failing_write(self, key, members):
        calls[0] += self.path.name.startswith("train-")  # output shards only (pass 1 writes group tars too)
        if calls[0] == 15:
            raise OSError("simulated crash: disk full")
        return original(self, key, members)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated crash"):
        prepare_data.run(small(), COMMON, data=str(out))
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]  # only whole shards exist
    monkeypatch.setattr(ShardWriter, "write", original)
    prepare_data.run(small(), COMMON, data=str(out))
    assert shard_sums(out) == shard_sums(reference)
    verify_shards(str(out), load_manifest(str(out)))


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
    out = tmp_path / "data"
    (tmp_path / "data").mkdir()
    (out / "keep-me.txt").write_text("not ours")
    prepare_data.run(replace(small(), shard_size=4), COMMON, data=str(out))
    prepare_data.run(replace(small(), shard_size=100), COMMON, data=str(out))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert (out / "keep-me.txt").exists()


def test_too_few_valid_samples_fail_with_a_clear_message(tmp_path):
    rows = [("ok1", encode(noise(1), "PNG"), "a picture", "a noise picture")]
    rows += [(f"bad{i}", b"not an image", "text", "a text file") for i in range(3)]
    out = tmp_path / "data"
    with pytest.raises(StageError) as info:
        prepare_data.run(
            small(write_manifest(tmp_path, rows), validation=ValidationConfig()), COMMON, data=str(out)
        )
    message = str(info.value)
    for part in (
        "only 1 of 4 samples (25.0%)",
        "min_valid_fraction 90.0%",
        "not_an_image 3",
        "quarantine.jsonl",
    ):
        assert part in message
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    assert len((out / "quarantine.jsonl").read_text().splitlines()) == 3
    assert (out / "validation" / "data_docs" / "index.html").is_file()  # the report is there to read


def test_critical_expectation_failure_fails_the_stage(tmp_path):
    cfg = small(SCENES, validation=ValidationConfig(max_rows=5))
    with pytest.raises(
        StageError, match=r"critical great-expectations.*expect_table_row_count_to_be_between"
    ):
        prepare_data.run(cfg, COMMON, data=str(tmp_path / "data"))


def test_missing_emoji_font_is_skipped_and_the_stage_still_runs(tmp_path, caplog):
    cfg = small(SCENES, EmojiSource(name="emoji", count=5, font_path=str(tmp_path / "no.ttf")))
    result = prepare_data.run(cfg, COMMON, data=str(tmp_path / "data"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert result.seen == 24 and "fonts-noto-color-emoji" in manifest["sources"][1]["skipped"]
    assert any("fonts-noto-color-emoji" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_s3_webdataset_in_and_s3_output(tmp_path, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    shard = tmp_path / "in-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            for ext, data in (
                ("jpg", encode(noise(40 + i), "JPEG")),
                ("txt", f"picture {i}".encode()),
                ("json", json.dumps({"long": [f"noise picture number {i}", "noise"]}).encode()),
            ):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.upload_file(str(shard), bucket, "raw/in-000000.tar")
    s3.put_object(Bucket=bucket, Key="prepared/train-000009.tar", Body=b"stale shard of an older run")
    wds = WebDatasetSource(
        name="web",
        urls=f"s3://{bucket}/raw/in-{{000000..000000}}.tar",
        caption_fields={"short": "txt", "dense": "json:long"},
    )
    common = replace(COMMON, s3_endpoint_url=endpoint)
    target = f"s3://{bucket}/prepared"
    result = prepare_data.run(small(SCENES, wds), common, data=target)
    manifest = load_manifest(target, endpoint, caption_fields=("short", "dense"))
    verify_shards(target, manifest, endpoint)
    assert manifest["counts"]["per_source"]["web"]["seen"] == 6 and result.seen == 30
    web = [
        s
        for split in ("train", "val")
        for s in iter_samples(target, split, endpoint_url=endpoint)
        if s.meta["source"] == "web"
    ]
    assert len(web) == 6 and all(s.captions["dense"][1] == "noise" for s in web)
    names = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]}
    assert "prepared/train-000009.tar" not in names and "prepared/validation/expectations.json" in names


def test_cli_with_mlflow_tracking_and_webdataset_reader(tmp_path, sqlite_tracking):
    import webdataset as wds
    from mlflow.tracking import MlflowClient

    out = tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "llm2clip",
        "prepare_data",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        "prepare_data.sources.0.count=16",
        "--set",
        "prepare_data.sources.1.count=8",
        "--set",
        "prepare_data.shard_size=8",
        "--set",
        "common.tracking=true",
        "--set",
        f"common.tracking_uri={sqlite_tracking}",
        "--set",
        "common.experiment=prep-test",
        "--data",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GX_ANALYTICS_ENABLED": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepare_data done" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=sqlite_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("prep-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["llm2clip.stage"] == "prepare_data"
    assert run.data.metrics["train"] == manifest["counts"]["train"] and run.data.metrics["seen"] == 24
    assert run.data.metrics["source.scenes.seen"] == 16 and run.data.metrics["shards"] >= 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"validation", "manifest.json", "quarantine.jsonl"} <= artifacts
    urls = [str(out / s["name"]) for s in manifest["shards"]["train"]]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "json", "__key__"))
    assert len(rows) == manifest["counts"]["train"]
    image, meta, key = rows[0]
    assert image.mode == "RGB" and meta["key"] == key and len(meta["captions"]["dense"]) == 1


# ------------------------------------------------ issue 11: the layouts public data sets use

ONE_FIELD = CommonConfig(tracking=False, seed=0, caption_fields=("short",))


def shard_captions(out: Path) -> dict[str, list[str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s.key: s.captions["short"] for split in ("train", "val") for s in iter_samples(str(out), split,
                                                                                         manifest=manifest)}


def coco_like(folder: Path, images: int = 6, per_image: int = 5) -> list[tuple[str, str]]:
    """``(image, caption)`` rows, ``per_image`` per image, interleaved like a shuffled export."""
    for i in range(images):
        (folder / f"{i:012d}.jpg").write_bytes(encode(noise(100 + i), "JPEG"))
    return [(f"{i:012d}.jpg", f"caption {c} of picture {i}") for c in range(per_image) for i in range(images)]


def test_coco_csv_one_row_per_caption_loses_no_row(tmp_path):
    rows = coco_like(tmp_path)
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    src = ManifestSource(name="coco", path=str(tmp_path / "captions.csv"), caption_columns={"short": "caption"})
    result = prepare_data.run(small(src), ONE_FIELD, data=str(tmp_path / "data"))
    assert (result.seen, result.quarantined, result.train + result.val) == (6, 0, 6)
    captions = shard_captions(tmp_path / "data")
    assert all(len(c) == 5 for c in captions.values())
    assert sorted(c for cs in captions.values() for c in cs) == sorted(c for _, c in rows)  # zero rows lost
    assert captions["coco-000000000003"] == [f"caption {c} of picture 3" for c in range(5)]  # file order


@pytest.mark.parametrize("layout", ["list", "rows"])
def test_flickr_jsonl_gives_five_captions_per_image(tmp_path, layout):
    rows = coco_like(tmp_path, images=5)
    if layout == "list":
        by_image: dict[str, list[str]] = {}
        for image, caption in rows:
            by_image.setdefault(image, []).append(caption)
        lines = [json.dumps({"image": i, "sentences": c}) for i, c in by_image.items()]
    else:
        lines = [json.dumps({"image": i, "sentences": c}) for i, c in rows]
    (tmp_path / "flickr.jsonl").write_text("\n".join(lines) + "\n")
    src = ManifestSource(name="flickr", path=str(tmp_path / "flickr.jsonl"), caption_columns={"short": "sentences"})
    result = prepare_data.run(small(src), ONE_FIELD, data=str(tmp_path / "data"))
    assert (result.seen, result.quarantined, result.train + result.val) == (5, 0, 5)
    captions = shard_captions(tmp_path / "data")
    assert all(len(c) == 5 for c in captions.values())
    assert sorted(c for cs in captions.values() for c in cs) == sorted(c for _, c in rows)


def test_quarantine_records_name_the_manifest_line_and_why_rows_could_not_merge(tmp_path):
    rows = coco_like(tmp_path, images=4, per_image=2)
    lines = ["image,caption,cls", *(f"{i},{c},thing" for i, c in rows)]
    lines += [f"{rows[0][0]},a clash,other", "gone.jpg,x y z,"]  # lines 10 and 11
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    src = ManifestSource(name="m", path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"},
                         label_column="cls")
    prepare_data.run(small(src), ONE_FIELD, data=str(tmp_path / "data"))
    quarantine = [json.loads(q) for q in (tmp_path / "data" / "quarantine.jsonl").read_text().splitlines()]
    by_line = {q["line"]: q for q in quarantine}
    assert sorted(by_line) == [10, 11]
    assert by_line[10]["reason"] == "duplicate_key" and "line 2" in by_line[10]["detail"]
    assert "'other'" in by_line[10]["detail"] and "agree on image and label" in by_line[10]["detail"]
    assert by_line[11]["reason"] == "missing_image"


def test_a_missing_manifest_is_a_clear_error_before_the_output_is_touched(tmp_path):
    out = tmp_path / "data"
    prepare_data.run(small(SCENES), COMMON, data=str(out))
    before = shard_sums(out)
    src = ManifestSource(name="m", path=str(tmp_path / "typo" / "captions.csv"),
                         caption_columns={"short": "caption", "dense": "caption"})
    with pytest.raises(StageError, match=r"sources\[0\] \(m\): manifest \S*typo/captions\.csv does not exist"):
        prepare_data.run(small(src), COMMON, data=str(out))
    assert shard_sums(out) == before


def test_a_caption_longer_than_the_csv_field_limit_is_truncated_not_a_crash(tmp_path):
    rows = coco_like(tmp_path, images=3, per_image=2)
    rows[0] = (rows[0][0], "very long " * 20_000)  # 200 000 characters > csv's 131 072
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    src = ManifestSource(name="m", path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"})
    result = prepare_data.run(small(src), ONE_FIELD, data=str(tmp_path / "data"))
    assert (result.seen, result.quarantined) == (3, 0)
    counts = json.loads((tmp_path / "data" / "manifest.json").read_text())["counts"]
    assert counts["captions_truncated"] == 1
    assert max(len(c) for cs in shard_captions(tmp_path / "data").values() for c in cs) <= 2000


def test_a_latin1_csv_prepares_without_mojibake_and_says_so(tmp_path, caplog):
    rows = coco_like(tmp_path, images=4, per_image=1)
    rows = [(i, f"{c}: café crème, naïve façade") for i, c in rows]
    text = "image,caption\n" + "".join(f'{i},"{c}"\n' for i, c in rows)
    (tmp_path / "m.csv").write_bytes(text.encode("latin-1"))
    src = ManifestSource(name="m", path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"})
    cfg = small(src, validation=ValidationConfig(min_captions=1))
    prepare_data.run(cfg, ONE_FIELD, data=str(tmp_path / "data"))
    captions = [c for cs in shard_captions(tmp_path / "data").values() for c in cs]
    assert sorted(captions) == sorted(c for _, c in rows) and not any("\ufffd" in c for c in captions)
    assert any("not UTF-8" in r.getMessage() and "16 non-ASCII" in r.getMessage() for r in caplog.records)


def test_an_optional_dense_column_empty_in_most_rows_keeps_every_sample(tmp_path):
    rows = coco_like(tmp_path, images=6, per_image=1)
    lines = ["image,caption,long"] + [f"{i},{c},{'a long description ' + c if n % 3 == 0 else ''}"
                                      for n, (i, c) in enumerate(rows)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    src = ManifestSource(name="m", path=str(tmp_path / "m.csv"), caption_columns={"short": "caption", "dense": "long"},
                         optional_captions=("dense",))
    result = prepare_data.run(small(src), COMMON, data=str(tmp_path / "data"))
    assert (result.seen, result.quarantined, result.train + result.val) == (6, 0, 6)


def test_a_full_disk_is_one_clear_error_and_leaves_no_output_that_looks_complete(tmp_path, caplog):
    """prepare_data writes its shards onto a 1 MiB tmpfs that fills up: exit 2, one ERROR line
    naming the lack of space; no manifest.json (the output reads unfinished), no temp file left."""
    import logging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tmpfs import tmpfs

    from llm2clip.cli import main
    from llm2clip.config import to_dict

    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=300, image_size=128),), shard_size=50,
                            image_max_side=128, jpeg_quality=95, workers=1)
    args = ["--common-json", json.dumps(to_dict(CommonConfig(tracking=False))), "--config-json",
            json.dumps(to_dict(cfg))]
    with tmpfs(tmp_path / "small", "1m") as small:
        code = main(["prepare_data", *args, "--data", str(small / "data")])
        left = sorted(p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file())
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "space" in errors[0].getMessage().lower() and errors[0].exc_info is None
    assert "data/manifest.json" not in left and not [n for n in left if ".tmp-" in n]
    # the same run with room: a complete output
    assert main(["prepare_data", *args, "--data", str(tmp_path / "roomy")]) == 0
    assert (tmp_path / "roomy" / "manifest.json").is_file()
