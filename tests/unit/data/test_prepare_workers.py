"""prepare_data with a pool of workers: the same output for any worker count, and the same output
as the single-process implementation it replaced (golden sha256 recorded before the change)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip.config import (
    CommonConfig,
    ConfigError,
    EmojiSource,
    ManifestSource,
    PrepareDataConfig,
    SyntheticSource,
    ValidationConfig,
    WebDatasetSource,
    config_hash,
    load_params,
    to_dict,
)
from llm2clip.data import groups, pool
from llm2clip.data.collect import KeptTable, assign_splits, dedupe, shard_order, split_of
from llm2clip.data.shards import ShardWriter, load_manifest, verify_shards
from llm2clip.data.sources import expand_urls
from llm2clip.stages import prepare_data

REPO = Path(__file__).resolve().parents[3]
COMMON = CommonConfig(tracking=False, seed=0)


def png(seed: int, w: int = 56, h: int = 48) -> bytes:
    """A lossless noise picture: its decoded pixels do not depend on the encoder's version."""
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def mixed_inputs(root: Path) -> PrepareDataConfig:
    """A demo-like mix in ``root`` (run with ``root`` as the working directory: every path in it is
    relative, so the ``source_id`` written into the shards is the same wherever it runs).

    Synthetic scenes, emoji, a JSONL manifest (bad rows, an exact duplicate, a shared image) and two
    webdataset shards (broken samples, a key that is in both shards).
    """
    (root / "imgs").mkdir()
    rows = []
    for i in range(10):
        (root / "imgs" / f"p{i}.png").write_bytes(png(100 + i))
        rows.append({"id": f"p{i}", "file": f"p{i}.png", "s": f"picture number {i}", "d": f"noise, seed {100 + i}"})
    rows.append({"id": "copy", "file": "p3.png", "s": "picture number 3", "d": "noise, seed 103"})  # duplicate
    rows.append({"id": "shared", "file": "p4.png", "s": "the fourth one again", "d": "same pixels, new words"})
    (root / "imgs" / "text.png").write_bytes(b"not an image at all" * 4)
    rows.append({"id": "text", "file": "text.png", "s": "a text file", "d": "named like a png"})
    rows.append({"id": "gone", "file": "gone.png", "s": "a missing file", "d": "never written"})
    rows.append({"id": "short", "file": "p5.png", "s": "x", "d": "y"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = ManifestSource(name="m", path="m.jsonl", image_root="imgs", image_column="file", key_column="id",
                              caption_columns={"short": "s", "dense": "d"})
    for shard in range(2):
        samples = [(f"{shard}{i:03d}", {"png": png(200 + 10 * shard + i), "txt": f"web picture {shard} {i}".encode(),
                                        "json": json.dumps({"long": [f"web noise {shard}/{i}"]}).encode()})
                   for i in range(5)]
        broken = {"jpg": b"\xff\xd8 broken", "txt": b"broken jpeg bytes"}
        samples.append(("bad", broken if shard else {**broken, "json": b'{"long": "broken"}'}))  # in both shards
        if shard:  # the key of a kept sample of shard 0: a duplicate_key
            samples.append(("0001", {"png": png(299), "txt": b"another picture", "json": b'{"long": "same key"}'}))
        _tar(root / f"wds-{shard:06d}.tar", samples)
    web = WebDatasetSource(name="web", urls="wds-{000000..000001}.tar",
                           caption_fields={"short": "txt", "dense": "json:long"})
    return PrepareDataConfig(
        sources=(SyntheticSource(name="scenes", count=24, image_size=64), manifest, web,
                 EmojiSource(name="emoji", count=8, image_size=64)),
        val_fraction=0.3, shard_size=7, image_max_side=48,
        validation=ValidationConfig(min_valid_fraction=0.5),
    )


def output_sums(out: Path) -> dict[str, str]:
    """sha256 of every output file that must not depend on the worker count, and of the manifest
    without its ``config_hash`` (which changes whenever a config class gains a field)."""
    names = sorted(p.name for p in out.glob("*.tar")) + ["quarantine.jsonl", "validation/preview.jpg"]
    sums = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config_hash"]
    text = json.dumps(manifest, sort_keys=True)
    sums["manifest.json without config_hash"] = hashlib.sha256(text.encode()).hexdigest()
    return sums


# Recorded with the single-process implementation (commit ac3823f, before prepare_data.workers):
# tests/unit/data/test_prepare_workers.py's mixed_inputs and params.yaml's demo sections. The
# manifest's sum leaves out config_hash; with the old code's config_hash put back, the manifest
# file was byte-identical to the old one (its sha256: 609beb13... mixed, 592e0451... demo).
GOLDEN_MIXED = {
    "train-000000.tar": "9948bd211026200b920bc0ad902d6ca6369fb061455370cd89697d602d7bb697",
    "train-000001.tar": "37eea8929005109c2b1039c73bcc2b01ee1e864f12e45d0bce459bb77a8e9686",
    "train-000002.tar": "84e5a76a09637f23c3e0146710ee35c9fb47f6ec4849c225afcbb865893ac448",
    "train-000003.tar": "ebf8e7e9a491f4624c80d90b3c222216a6062d09e09204533337f730e1b467fe",
    "train-000004.tar": "35f4faa0438a5a61234d2299fd89ba0ecc17612625619e4fec726f963b360a95",
    "val-000000.tar": "49bb85e23af3dc16d231c92bbee2a96d095e701e6b3e8d7ca002c3aa87b2b79c",
    "val-000001.tar": "22539dd014385430d2c4f9850abc29fe6599a597fbe018d2785edbf8b4ebf726",
    "val-000002.tar": "a520c8f8925ce8e0c3e70ac87931c5b1b1d392a14610ea94352c2f65c02efa81",
    "quarantine.jsonl": "cbeb372983a276ae3f8266fa9859d6b2b1cede2966adc8a87aeab5c488dfd106",
    "manifest.json without config_hash": "f27af1046e73f2fa01fbe2a4c3d82dc944d8f7e51fddc9aa3bf0be961eda8910",
    "validation/preview.jpg": "a22d92271496fc83018260f8276d1d38a8780d9107619ad22529a0767be7b336",
}
GOLDEN_DEMO = {
    "train-000000.tar": "e766c70f51be81ed52587b3c7f2b09ed04389d3695e6bb3ef9c138c2c058a455",
    "train-000001.tar": "710170630c2dde78938d3f9517aab7b60016f3c01997e5c31fb266aabc64eadc",
    "train-000002.tar": "314115937fc8dfe6467d41dcfd5cb6d9f7dc73590b3977ebc22e164296b15b9c",
    "train-000003.tar": "2fc00bd0bb82b5b6566e21b8e477e0ab717b5ac04f8417234cbe708737eb6071",
    "val-000000.tar": "f36266349ec1a42063194f52261b40a576fe77874b682bef33775216fdaf06c8",
    "quarantine.jsonl": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "manifest.json without config_hash": "21f82d41062e9785119155dc992f9e81391f034409fa8acbf55fde0d44014424",
    "validation/preview.jpg": "9e38a12a9bdec921614b9b71372262804ca239c2a81600cedd868bcd170c81f8",
}
OUTPUT = re.compile(r"^(manifest\.json|quarantine\.jsonl|validation|(train|val)-\d{6}\.tar)$")


@pytest.fixture()
def mixed(tmp_path, monkeypatch) -> PrepareDataConfig:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(groups, "SAMPLES_PER_GROUP", 4)  # the manifest's 15 samples in 4 groups
    return mixed_inputs(tmp_path)


def test_plan_cuts_shards_and_manifest_ranges_and_keeps_generators_whole(mixed):
    plan = groups.plan_groups(mixed, COMMON)
    assert [(g.number, g.source, g.url, g.start, g.stop) for g in plan.groups] == [
        (0, 0, "", 0, None),  # synthetic: one seeded stream
        (1, 1, "", 0, 4), (2, 1, "", 4, 8), (3, 1, "", 8, 12), (4, 1, "", 12, 15),  # manifest ranges
        (5, 2, "wds-000000.tar", 0, None), (6, 2, "wds-000001.tar", 0, None),  # one per input shard
        (7, 3, "", 0, None),  # emoji
    ]
    assert plan.total is None and plan.skipped == {}  # webdataset shards cannot say their size


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_any_worker_count_writes_the_single_process_output_byte_for_byte(mixed, tmp_path, workers):
    result = prepare_data.run(replace(mixed, workers=workers), COMMON, data=str(tmp_path / "out"))
    assert output_sums(tmp_path / "out") == GOLDEN_MIXED
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())["config_hash"]
    assert written == result.config_hash == config_hash(COMMON, {k: v for k, v in to_dict(mixed).items()
                                                                 if k != "workers"})  # the old formula
    assert all(OUTPUT.match(p.name) for p in (tmp_path / "out").iterdir())  # no .groups, no temp file left


def test_the_demo_output_is_the_single_process_output(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.prepare_data.workers == 0  # automatic: 800 samples run in one process
    assert groups.workers_for(groups.plan_groups(params.prepare_data, params.common), 0) == 1
    prepare_data.run(params.prepare_data, replace(params.common, tracking=False), data=str(tmp_path / "demo"))
    assert output_sums(tmp_path / "demo") == GOLDEN_DEMO


def test_automatic_workers_start_processes_only_for_a_plan_worth_it(monkeypatch):
    cores = pool.worker_count(0)
    many = [groups.Group(i, 0) for i in range(3)]
    assert groups.workers_for(groups.Plan(many, total=None), 0) == cores  # webdataset shards: size unknown
    assert groups.workers_for(groups.Plan(many, total=groups.POOL_MIN_SAMPLES), 0) == cores
    assert groups.workers_for(groups.Plan(many, total=groups.POOL_MIN_SAMPLES - 1), 0) == 1
    assert groups.workers_for(groups.Plan(many[:1], total=None), 0) == 1
    assert groups.workers_for(groups.Plan(many[:1], total=10), 3) == 3  # asked for: always


def test_a_crash_in_pass_1_leaves_finished_groups_that_a_rerun_reuses(mixed, tmp_path, monkeypatch, caplog):
    cfg, out, calls = replace(mixed, workers=1), tmp_path / "out", [0]
    original = groups._outcome

    def crash_in_the_fourth_group(raw, job, writer):
        calls[0] += 1
        if job.group.number == 3:
            raise OSError("simulated crash: the pod was evicted")
        return original(raw, job, writer)

    monkeypatch.setattr(groups, "_outcome", crash_in_the_fourth_group)
    with pytest.raises(OSError, match="evicted"):
        prepare_data.run(cfg, COMMON, data=str(out))
    left = sorted(p.name for p in (out / groups.GROUPS_DIR).iterdir())
    assert left == [f"group-{n:06d}.{ext}" for n in range(3) for ext in ("json", "tar")]  # whole groups only
    assert not (out / "manifest.json").exists()
    (out / groups.GROUPS_DIR / "group-000001.tar").write_bytes(b"damaged")  # its marker no longer matches

    monkeypatch.setattr(groups, "_outcome", original)
    calls[0] = 0
    with caplog.at_level(logging.INFO, logger="llm2clip"):
        prepare_data.run(cfg, COMMON, data=str(out))
    assert output_sums(out) == GOLDEN_MIXED
    assert any("2 of 8 groups reused" in r.getMessage() for r in caplog.records)
    assert not (out / groups.GROUPS_DIR).exists()


def test_a_group_of_other_settings_is_not_reused(mixed, tmp_path):
    store = groups.groups_store(str(tmp_path / "out"))
    job = groups.GroupJob(groups.Group(0, 0), mixed.sources[0], mixed, COMMON, store)
    first = groups.run_group(job)
    assert not first.reused and groups.run_group(job).reused
    other = replace(job, cfg=replace(mixed, jpeg_quality=80))
    assert not groups.run_group(other).reused
    assert groups.fingerprint(other) != groups.fingerprint(job)


def test_s3_output_with_workers_leaves_no_intermediate_files(mixed, tmp_path, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    target = f"s3://{bucket}/prepared"
    prepare_data.run(replace(mixed, workers=2), replace(COMMON, s3_endpoint_url=endpoint), data=target)
    names = {o["Key"].removeprefix("prepared/") for o in
             boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]}
    shards = {n for n in names if n.endswith(".tar")}
    assert shards == {n for n in GOLDEN_MIXED if n.endswith(".tar")}
    assert not any(n.startswith(groups.GROUPS_DIR) for n in names)
    verify_shards(target, load_manifest(target, endpoint), endpoint)
    assert {s["name"]: s["sha256"] for split in load_manifest(target, endpoint)["shards"].values()
            for s in split} == {n: GOLDEN_MIXED[n] for n in shards}


def test_a_worker_s_warnings_are_logged_in_the_parent_in_group_order(tmp_path, caplog):
    _tar(tmp_path / "good.tar", [("a", {"png": png(1), "txt": b"a picture"})])
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 40)
    cfg = PrepareDataConfig(sources=(WebDatasetSource(name="web", urls=f"{tmp_path}/{{broken,good,broken}}.tar",
                                                      caption_fields={"short": "txt"}),), workers=2)
    common = replace(COMMON, caption_fields=("short",))
    plan = groups.plan_groups(cfg, common)
    jobs = [groups.GroupJob(g, plan.sources[g.source], cfg, common, groups.groups_store(str(tmp_path)))
            for g in plan.groups]
    with pool.make_executor(2) as executor:
        results = list(pool.ordered_map(executor, groups.run_group, jobs, window=4))
    assert [len(r.logs) for r in results] == [1, 0, 1]  # travelled back from the worker processes
    with caplog.at_level(logging.WARNING):
        for r in results:
            pool.replay_logs(r.logs)
    assert [f"shard {tmp_path}/broken.tar unreadable after 0 samples" in r.getMessage() for r in caplog.records] == [
        True, True]


def test_a_webdataset_url_with_braces_and_commas_is_one_group(tmp_path):
    (tmp_path / "odd{1,2}.tar").write_bytes(b"")
    url = str(tmp_path / "odd{1,2}.tar")
    assert expand_urls(groups._escape(url)) == [url]


def test_the_shard_writer_says_where_each_member_s_bytes_are(tmp_path):
    members = {"jpg": b"\xff\xd8" + bytes(range(256)) * 5, "json": b'{"key": "k"}'}
    long_key = "source-" + "x" * 150  # a name over 100 characters: a PAX header before the member
    with ShardWriter(tmp_path / "a.tar") as writer:
        places = [writer.write(key, members) for key in ("k", long_key, "k2")]
    data = (tmp_path / "a.tar").read_bytes()
    for where in places:
        assert {ext: data[at : at + n] for ext, (at, n) in where.items()} == members
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [m.name for m in tar][2:4] == [f"{long_key}.jpg", f"{long_key}.json"]


# ------------------------------------------------------------ the parent's table, dedupe, splits


def table_of(rows: list[tuple[str, str, str]]) -> KeptTable:
    """A table of ``(key, pixels, captions)`` rows (the hashes made from the two strings)."""
    table = KeptTable(["s"])
    for i, (key, pixels, captions) in enumerate(rows):
        digest = {name: hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
                  for name, text in (("pixel_hash", pixels), ("caption_hash", captions))}
        table.append(key, 0, 0, i, {"record": digest, "jpg": [i, 1], "json": [i + 1, 1]})
    return table


def keys_with_splits(n: int, fraction: float) -> tuple[list[str], list[str]]:
    keys = [f"s-{i:04d}" for i in range(n)]
    return [k for k in keys if split_of(k, fraction) == "train"], [k for k in keys if split_of(k, fraction) == "val"]


def test_copies_of_one_image_follow_the_smallest_key_so_val_never_leaks():
    train, val = keys_with_splits(200, 0.5)
    anchor = min(val[0], train[0], train[1])
    rows = [(val[0], "img", "cap a"), (train[0], "img", "cap b"), (train[1], "img", "cap c")]
    rows += [(k, f"px-{k}", "c") for k in train[2:6] + val[1:5]]
    table = table_of(rows)
    assert assign_splits(table, 0.5) == 1
    assert {table.split_name(r) for r in range(3)} == {split_of(anchor, 0.5)}
    assert all(table.split_name(r) == split_of(table.keys[r], 0.5) for r in range(3, len(table)))
    assert assign_splits(table, 0.5, eval_set="coco") == 1 and {table.split_name(r) for r in range(len(table))} == {
        "test"}


def test_exact_duplicates_keep_the_smallest_key_and_the_table_keeps_its_order():
    table = table_of([("s-3", "img", "same"), ("s-1", "img", "same"), ("s-2", "img", "other"),
                      ("s-0", "img", "same"), ("s-9", "x", "y")])
    kept, pairs = dedupe(table)
    assert kept.keys == ["s-2", "s-0", "s-9"] and list(kept.index) == [2, 3, 4]
    assert [(table.keys[d], table.keys[k]) for d, k in pairs] == [("s-1", "s-0"), ("s-3", "s-0")]
    assert kept.shard_item(2) == ("s-9", "group-000000", 4, 1, 5, 1)


def test_shard_order_is_sha256_order_of_seed_and_key():
    table = table_of([(f"k-{i}", f"p{i}", "c") for i in range(300)])
    assign_splits(table, 0.3)
    for split in ("train", "val"):
        rows = shard_order(table, split, seed=7).tolist()
        expected = sorted((r for r in range(len(table)) if table.split_name(r) == split),
                          key=lambda r: hashlib.sha256(f"7:{table.keys[r]}".encode()).digest())
        assert rows == expected


def test_worker_count_zero_means_every_core_this_process_may_use(tmp_path):
    assert pool.worker_count(0) == min(len(os.sched_getaffinity(0)), pool.cpu_limit() or 99)
    assert pool.worker_count(3) == 3
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("250000 100000\n")  # a pod limited to 2.5 CPUs
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert (pool.cpu_limit(str(tmp_path / "v2")), pool.cpu_limit(str(tmp_path / "v1"))) == (3, None)
    assert pool.cpu_limit(str(tmp_path / "none")) is None
    with pytest.raises(ConfigError, match="prepare_data.workers"):
        PrepareDataConfig(workers=-1)
