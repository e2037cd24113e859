"""prepare_data for an evaluation set: one ``test`` split, the set's name in the manifest, and
labelled sets without any caption field; training data keeps its train/val layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import benchmark_fixtures as F
import pytest

from llm2clip.config import (
    CommonConfig,
    ImageNetSource,
    KarpathySource,
    ManifestSource,
    PrepareDataConfig,
    SyntheticSource,
    ValidationConfig,
)
from llm2clip.data.benchmarks import imagenet
from llm2clip.data.shards import iter_samples, load_manifest, verify_shards
from llm2clip.data.validate import clean_captions
from llm2clip.io import StageError
from llm2clip.stages import prepare_data


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tar"))


def test_karpathy_eval_set_writes_one_test_split(tmp_path):
    path = F.karpathy_coco(tmp_path / "coco")
    cfg = PrepareDataConfig(sources=(KarpathySource(name="coco", path=str(path)),), eval_set="coco",
                            validation=ValidationConfig(min_captions=1), shard_size=1)
    out = tmp_path / "out"
    result = prepare_data.run(cfg, CommonConfig(caption_fields=("captions",), tracking=False), data=str(out))
    assert (result.test, result.train, result.val, result.seen, result.shards) == (2, 0, 0, 2, 2)
    assert shard_files(out) == ["test-000000.tar", "test-000001.tar"]
    manifest = load_manifest(str(out))
    assert manifest["eval_set"] == "coco" and list(manifest["shards"]) == ["test"]
    assert manifest["counts"]["test"] == 2 and "train" not in manifest["counts"]
    assert manifest["counts"]["per_source"]["coco"] == {"seen": 2, "test": 2, "quarantined": 0}
    assert manifest["split"]["eval_set"] == "coco" and manifest["validation"]["success"]
    verify_shards(str(out), manifest)
    samples = {s.key: s for s in iter_samples(str(out), "test", manifest=manifest)}
    assert samples["coco-391895"].captions == {"captions": F.COCO_SENTENCES[:5]}
    assert len(samples["coco-522418"].captions["captions"]) == 5


def test_imagenet_eval_set_without_caption_fields(tmp_path):
    root = F.imagenet_folders(tmp_path / "imagenet")
    cfg = PrepareDataConfig(sources=(ImageNetSource(name="imagenet", path=str(root)),), eval_set="imagenet",
                            validation=ValidationConfig(min_captions=1))
    out = tmp_path / "out"
    result = prepare_data.run(cfg, CommonConfig(caption_fields=(), tracking=False), data=str(out))
    assert (result.test, result.quarantined) == (3, 0) and shard_files(out) == ["test-000000.tar"]
    manifest = load_manifest(str(out))
    assert manifest["caption_fields"] == [] and manifest["eval_set"] == "imagenet"
    assert manifest["labels"] == {"imagenet": ["goldfish", "tench"]}
    samples = list(iter_samples(str(out), "test", manifest=manifest))
    assert Counter(s.label for s in samples) == {"tench": 2, "goldfish": 1}
    assert all(s.captions == {} for s in samples)
    assert (out / "validation" / "preview.jpg").is_file()


def test_training_data_keeps_train_and_val_only(tmp_path):
    out = tmp_path / "out"
    cfg = PrepareDataConfig(sources=(SyntheticSource(count=40, image_size=64),), val_fraction=0.25)
    result = prepare_data.run(cfg, CommonConfig(tracking=False), data=str(out))
    names = shard_files(out)
    assert names and all(n.startswith(("train-", "val-")) for n in names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "eval_set" not in manifest and list(manifest["shards"]) == ["train", "val"]
    assert "test" not in manifest["counts"] and set(manifest["counts"]["per_source"]["synthetic"]) == {
        "seen", "train", "val", "quarantined"}
    assert manifest["split"]["val_fraction"] == 0.25 and result.test == 0 and result.train + result.val == 40


def test_an_eval_run_removes_a_previous_runs_shards_of_every_split(tmp_path):
    out = tmp_path / "out"
    prepare_data.run(PrepareDataConfig(sources=(SyntheticSource(count=20, image_size=64),), val_fraction=0.5),
                     CommonConfig(tracking=False), data=str(out))
    root = F.imagenet_folders(tmp_path / "imagenet")
    prepare_data.run(PrepareDataConfig(sources=(ImageNetSource(name="in", path=str(root)),), eval_set="in"),
                     CommonConfig(caption_fields=(), tracking=False), data=str(out))
    assert shard_files(out) == ["test-000000.tar"]


def test_no_caption_fields_need_no_caption():
    assert clean_captions({}, (), ValidationConfig(min_captions=2), Counter()) == {}


def test_a_labelled_set_without_labels_fails_the_gate(tmp_path, monkeypatch):
    root = F.imagenet_folders(tmp_path / "imagenet", mapping=False)
    monkeypatch.setattr(imagenet, "class_names", lambda src, wnids, endpoint_url: dict.fromkeys(wnids, ""))
    with pytest.raises(StageError, match=r"expect_column_values_to_not_be_null\(\{'column': 'label'\}\)"):
        prepare_data.run(PrepareDataConfig(sources=(ImageNetSource(name="in", path=str(root)),), eval_set="in"),
                         CommonConfig(caption_fields=(), tracking=False), data=str(tmp_path / "out"))


def test_a_labelled_csv_manifest_needs_no_caption_columns(tmp_path):
    F.image(tmp_path / "a.jpg")
    F.image(tmp_path / "b.jpg")
    (tmp_path / "labels.csv").write_text("image,cls\na.jpg,cat\nb.jpg,dog\n")
    src = ManifestSource(path=str(tmp_path / "labels.csv"), caption_columns={}, label_column="cls")
    result = prepare_data.run(PrepareDataConfig(sources=(src,), eval_set="pets"),
                              CommonConfig(caption_fields=(), tracking=False), data=str(tmp_path / "out"))
    assert result.test == 2 and load_manifest(str(tmp_path / "out"))["labels"] == {"manifest": ["cat", "dog"]}
