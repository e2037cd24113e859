"""Dedupe, split assignment, the deterministic atomic shard writer and the readers."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

from llm2clip.data.collect import split_of
from llm2clip.data.shards import (
    ShardWriter,
    encode_meta,
    invalidate,
    iter_samples,
    load_manifest,
    shard_entry,
    verify_shards,
)
from llm2clip.io import StageError, atomic_write_json


def keys_with_splits(n: int, fraction: float) -> tuple[list[str], list[str]]:
    keys = [f"s-{i:04d}" for i in range(n)]
    return [k for k in keys if split_of(k, fraction) == "train"], [
        k for k in keys if split_of(k, fraction) == "val"
    ]


def test_split_by_key_hash_is_stable_and_close_to_the_fraction():
    train, val = keys_with_splits(2000, 0.2)
    assert 0.17 < len(val) / 2000 < 0.23
    assert split_of(val[0], 0.2) == "val" and split_of(val[0], 0.0) == "train"


def write_shard(path, n: int = 3) -> None:
    with ShardWriter(path) as w:
        for i in range(n):
            w.write(f"k-{i}", {"jpg": b"\xff\xd8" + bytes([i]) * 10, "json": encode_meta({"key": f"k-{i}"})})


def test_shard_writer_is_byte_deterministic_with_fixed_headers(tmp_path):
    write_shard(tmp_path / "a.tar")
    write_shard(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:2] == ["k-0.jpg", "k-0.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}


def test_shard_writer_crash_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "train-000000.tar") as w:
        w.write("k-0", {"jpg": b"x", "json": b"{}"})
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_invalidate_removes_only_prepare_data_files(tmp_path):
    for name in [
        "manifest.json",
        "train-000000.tar",
        "val-000003.tar",
        ".train-000001.tar.tmp-abc",
        "notes.txt",
        "other-000000.tar",
    ]:
        (tmp_path / name).write_text("x")
    removed = invalidate(str(tmp_path))
    assert removed[0] == "manifest.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other-000000.tar"]


def fake_output(tmp_path) -> dict:
    write_shard(tmp_path / "train-000000.tar", 3)
    manifest = {
        "stage": "prepare_data",
        "format_version": 1,
        "caption_fields": ["short", "dense"],
        "shards": {"train": [shard_entry(tmp_path / "train-000000.tar", 3)], "val": []},
    }
    atomic_write_json(tmp_path / "manifest.json", manifest)
    return manifest


def test_readers_round_trip_and_checks(tmp_path):
    fake_output(tmp_path)
    manifest = load_manifest(str(tmp_path), caption_fields=("short",))
    samples = list(iter_samples(str(tmp_path), "train", manifest=manifest, decode=False))
    assert [(s.key, s.meta) for s in samples] == [(f"k-{i}", {"key": f"k-{i}"}) for i in range(3)]
    assert list(iter_samples(str(tmp_path), "val", manifest=manifest)) == []
    verify_shards(str(tmp_path), manifest)
    with pytest.raises(StageError, match="caption fields"):
        load_manifest(str(tmp_path), caption_fields=("long",))


def test_verify_detects_a_changed_shard_and_load_a_foreign_dir(tmp_path):
    manifest = fake_output(tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(b"tampered")
    with pytest.raises(StageError, match="sha256 differs"):
        verify_shards(str(tmp_path), manifest)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "evaluate"}))
    with pytest.raises(StageError, match="not a prepare_data"):
        load_manifest(str(tmp_path))
    assert hashlib.sha256(b"tampered").hexdigest() != manifest["shards"]["train"][0]["sha256"]
