"""Which dirs an eval set scores: the pipeline's own, explicit ones, or a prepared eval set found
by the name its manifests record (dirs written through the real manifest contracts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2clip.config import EvalSet
from llm2clip.contracts import write_manifest
from llm2clip.eval.inputs import expand_outputs, index_eval_sets, resolve_eval_sets
from llm2clip.io import StageError


def prepared(path: Path, eval_set: str | None, fields: tuple[str, ...] = ("captions",)) -> str:
    """A prepare_data output's manifest (every field its contract makes the writer record)."""
    body = {"caption_fields": list(fields), "shards": {"test": []}, "config_hash": "x", "counts": {"test": 0},
            "image": {}, "split": {}, "sources": [], "labels": {}, "validation": {}, "quarantine": {}}
    write_manifest("prepare_data", path, body | ({"eval_set": eval_set} if eval_set else {}))
    return str(path)


def embedded(path: Path, eval_set: str | None, fields: tuple[str, ...] = ("captions",)) -> str:
    """An embed_captions output's manifest (every field its contract makes the writer record)."""
    body = {"caption_fields": list(fields), "encoder": {"fingerprint": "f"}, "sidecars": {"test": []},
            "layout": "", "dim": 8, "dtype": "float16", "normalized": True, "precision": "fp32", "counts": {},
            "zeroshot": {}, "config_hash": "x", "data": {}}
    write_manifest("embed_captions", path, body | ({"eval_set": eval_set} if eval_set else {}))
    return str(path)


@pytest.fixture
def two_sets(tmp_path):
    for name, fields in (("coco", ("captions",)), ("imagenet", ())):
        prepared(tmp_path / "eval" / name, name, fields)
        embedded(tmp_path / "eval_emb" / name, name, fields)
    return tmp_path


def test_a_named_set_resolves_to_the_dirs_whose_manifests_name_it(two_sets):
    root = two_sets
    sets = (EvalSet(), EvalSet(name="coco5k", eval_data="coco", protocol="multi_caption"),
            EvalSet(name="in1k", eval_data="imagenet"), EvalSet(name="mine", data="d2", embeddings="e2", split="val"))
    given = ([str(root / "eval" / "imagenet"), str(root / "eval" / "coco")],
             [str(root / "eval_emb" / "coco"), str(root / "eval_emb" / "imagenet")])
    resolved = resolve_eval_sets(sets, "data", "emb", *given)
    assert [(r.name, r.data, r.embeddings, r.split) for r in resolved] == [
        ("val", "data", "emb", "val"),
        ("coco5k", str(root / "eval" / "coco"), str(root / "eval_emb" / "coco"), "test"),
        ("in1k", str(root / "eval" / "imagenet"), str(root / "eval_emb" / "imagenet"), "test"),
        ("mine", "d2", "e2", "val"),
    ]
    assert resolved[1].config.protocol == "multi_caption"


def test_a_folder_of_outputs_stands_for_each_of_them(two_sets):
    root = two_sets
    assert expand_outputs([str(root / "eval"), str(root / "missing")]) == [
        str(root / "eval" / "coco"), str(root / "eval" / "imagenet")]
    resolved = resolve_eval_sets((EvalSet(name="coco", eval_data="coco"),), "data", "emb",
                                 [str(root / "eval")], [str(root / "eval_emb")])
    assert (resolved[0].data, resolved[0].embeddings) == (str(root / "eval" / "coco"), str(root / "eval_emb" / "coco"))


def test_a_missing_set_is_one_line_naming_what_to_run(two_sets):
    root = two_sets
    with pytest.raises(StageError) as err:
        resolve_eval_sets((EvalSet(name="flickr", eval_data="flickr30k"),), "data", "emb",
                          [str(root / "eval")], [str(root / "eval_emb")])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("evaluate.eval_sets[flickr]: no prepared eval set 'flickr30k' among --eval-data")
    assert "sets found: coco, imagenet" in message
    assert "`dvc repro prepare_eval@flickr30k embed_eval@flickr30k`" in message
    assert "prepare_data --eval-set flickr30k" in message


def test_prepared_but_not_embedded(two_sets, tmp_path):
    root = two_sets
    prepared(root / "eval" / "docci", "docci", ("long",))
    with pytest.raises(StageError, match=r"no embedded eval set 'docci' among --eval-embeddings .*"
                                         r"`dvc repro embed_eval@docci`"):
        resolve_eval_sets((EvalSet(name="docci", eval_data="docci"),), "d", "e", [str(root / "eval")],
                          [str(root / "eval_emb")])


def test_training_data_is_skipped_and_a_name_claimed_twice_is_refused(tmp_path):
    prepared(tmp_path / "train_data", None)
    prepared(tmp_path / "a", "coco")
    assert index_eval_sets("prepare_data", [str(tmp_path / "train_data"), str(tmp_path / "a")]) == {
        "coco": str(tmp_path / "a")}
    prepared(tmp_path / "b", "coco")
    with pytest.raises(StageError, match="two prepare_data outputs are eval set 'coco'"):
        index_eval_sets("prepare_data", [str(tmp_path / "a"), str(tmp_path / "b")])
    # another stage's output where an eval set is expected: the contract's one-line refusal
    embedded(tmp_path / "emb", "coco")
    with pytest.raises(StageError, match="not a prepare_data v1 output"):
        index_eval_sets("prepare_data", [str(tmp_path / "emb")])


def test_no_named_set_reads_no_eval_dirs():
    # the pipeline's own data only: --eval-data may point at anything (it is not read)
    resolved = resolve_eval_sets((EvalSet(),), "data", "emb", ["/does/not/exist"], ["/nor/this"])
    assert [(r.data, r.embeddings, r.split) for r in resolved] == [("data", "emb", "val")]
