"""Captions-only reader of prepare_data shards."""

from __future__ import annotations

import json
import shutil

import pytest

from llm2clip.io import StageError
from llm2clip.text.data import read_captions, read_splits


def test_reads_named_captions_per_split(tiny_shards):
    train = read_captions(tiny_shards, "train", caption_fields=("short", "dense"))
    val = read_captions(tiny_shards, "val", caption_fields=("short", "dense"))
    assert (len(train), len(val)) == (48, 16)
    assert len({i.key for i in train} | {i.key for i in val}) == 64
    fields = [f for f, _ in train[0].flat(("dense", "short"))]
    assert fields == ["dense", "short"]


def test_checksum_and_field_mismatches_fail_loudly(tiny_shards, tmp_path):
    copy = shutil.copytree(tiny_shards, tmp_path / "data")
    with pytest.raises(StageError, match="missing"):
        read_captions(copy, "val", caption_fields=("short", "long"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"]["val"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="sha256"):
        read_captions(copy, "val", caption_fields=("short",))
    assert len(read_captions(copy, "val", caption_fields=("short",), verify=False)) == 16


def test_reads_both_splits_at_once(tiny_shards):
    splits = read_splits(tiny_shards, caption_fields=("short", "dense"))
    assert [len(splits[s]) for s in ("train", "val")] == [48, 16]


def test_missing_manifest_names_the_stage_to_run(tmp_path):
    with pytest.raises(StageError, match="has not finished"):
        read_captions(tmp_path, "train", caption_fields=("short",))
