"""Manifests as public data sets ship them (issue 11): one row per caption, optional caption
columns, giant fields, a missing file, non-UTF-8 text. Each test is written from the reported
symptom: it fails on the code before the fix."""

from __future__ import annotations

import codecs
import io
import json
import logging
import tarfile
from collections import Counter

import bad_inputs as B
import pytest

from llm2clip.config import ConfigError, ManifestSource, ValidationConfig, WebDatasetSource, load_params
from llm2clip.data import records as R
from llm2clip.data.records import SampleRejected
from llm2clip.data.sources import check_caption_mapping, iter_manifest, iter_webdataset
from llm2clip.data.validate import clean_captions, validate_sample
from llm2clip.io import StageError

FIELDS = ("short", "dense")
VALID = ValidationConfig()


def images(folder, *names: str) -> None:
    for i, name in enumerate(names):
        (folder / name).write_bytes(B.good_jpeg(seed=i))


def validate(raw, fields=FIELDS, cfg=VALID):
    stats: Counter = Counter()
    record, _ = validate_sample(raw, fields, cfg, max_side=64, jpeg_quality=90, stats=stats)
    return record, stats


# ------------------------------------------------------------- defect 2: one row per caption


def test_coco_rows_per_caption_merge_into_one_sample_per_image(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg")
    rows = ["image,caption"]
    for i in range(5):  # interleaved, as a shuffled COCO export is
        rows += [f"a.jpg,a caption {i} of a", f"b.jpg,a caption {i} of b"]
    rows.append("a.jpg,a caption 2 of a")  # an exact repeat is kept once
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    a, b = iter_manifest(ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"}))
    assert (a.key, a.line, b.key, b.line) == ("manifest-a", 2, "manifest-b", 3)
    assert a.captions["short"] == [f"a caption {i} of a" for i in range(5)] and a.error is None
    record, _ = validate(a, ("short",))
    assert len(record.captions["short"]) == 5


def test_rows_of_one_key_that_disagree_are_quarantined_with_line_numbers_and_a_hint(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "m.csv").write_text(
        "id,image,caption,cls\n1,a.jpg,a cat,cat\n1,a.jpg,a grey cat,\n1,a.jpg,a dog,dog\n1,b.jpg,a bird,cat\n"
    )
    src = ManifestSource(path=str(tmp_path / "m.csv"), key_column="id", label_column="cls",
                         caption_columns={"short": "caption"})
    kept, label_clash, image_clash = iter_manifest(src)
    assert kept.captions["short"] == ["a cat", "a grey cat"] and kept.label == "cat"  # no label merges
    assert label_clash.error[0] == image_clash.error[0] == R.DUPLICATE_KEY
    assert (label_clash.line, image_clash.line) == (4, 5)
    assert "line 4" in label_clash.error[1] and "line 2" in label_clash.error[1] and "'dog'" in label_clash.error[1]
    assert "b.jpg" in image_clash.error[1] and "key_column" in image_clash.error[1]


def test_same_stem_other_image_without_key_column_hints_at_key_column(tmp_path):
    images(tmp_path, "a.jpg", "a.png")
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,one\na.png,two\n")
    _, clash = iter_manifest(ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"}))
    assert clash.error[0] == R.DUPLICATE_KEY and "set key_column" in clash.error[1]


def test_flickr_jsonl_one_row_per_caption_and_one_row_with_a_list(tmp_path):
    images(tmp_path, "1.jpg", "2.jpg")
    lines = [json.dumps({"image": "1.jpg", "caption": f"caption {i}"}) for i in range(5)]
    lines.append(json.dumps({"image": "2.jpg", "caption": [f"other {i}" for i in range(5)]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    one, two = iter_manifest(ManifestSource(path=str(tmp_path / "m.jsonl"), caption_columns={"short": "caption"}))
    assert one.captions["short"] == [f"caption {i}" for i in range(5)]
    assert two.captions["short"] == [f"other {i}" for i in range(5)] and two.line == 6


def test_rejected_manifest_rows_carry_their_line_number(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "gone.jpg", "caption": "x y z"}\n\n{broken\n')
    gone, broken = iter_manifest(ManifestSource(path=str(tmp_path / "m.jsonl"), caption_columns={"short": "caption"}))
    assert (gone.line, gone.error[0], broken.line, broken.error[0]) == (1, R.MISSING_IMAGE, 3, R.BAD_METADATA)
    assert "m.jsonl:1" in gone.error[1]
    assert R.Rejection("k", "s", "i", "r", "d", line=3).to_json()["line"] == 3


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    (tmp_path / "m.csv").write_text('image,caption\nx.jpg,"two\nlines"\ny.jpg,one\n')
    x, y = iter_manifest(ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"}))
    assert (x.line, y.line) == (2, 4) and x.captions["short"] == ["two\nlines"]


# -------------------------------------------------------------- defect 3: optional captions


def optional_manifest(tmp_path) -> ManifestSource:
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    (tmp_path / "m.csv").write_text(
        "image,short,long\na.jpg,a cat,a grey cat sleeping on a red mat\nb.jpg,a dog,\nc.jpg,,a bird on a branch\n"
    )
    return ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "short", "dense": "long"},
                          optional_captions=("dense",))


def test_an_empty_optional_caption_keeps_the_sample_and_a_required_one_does_not(tmp_path):
    a, b, c = iter_manifest(optional_manifest(tmp_path))
    (ra, _), (rb, stats) = validate(a), validate(b)
    assert ra.captions == {"short": ["a cat"], "dense": ["a grey cat sleeping on a red mat"]}
    assert rb.captions == {"short": ["a dog"], "dense": []} and stats["optional_captions_missing"] == 1
    with pytest.raises(SampleRejected) as rej:
        validate(c)
    assert rej.value.reason == R.MISSING_CAPTION and "'short'" in rej.value.detail


def test_same_rows_without_optional_fail_as_before(tmp_path):
    src = optional_manifest(tmp_path)
    _, b, _ = iter_manifest(ManifestSource(path=src.path, caption_columns=src.caption_columns))
    with pytest.raises(SampleRejected, match="dense"):
        validate(b)


def test_a_missing_optional_field_lowers_min_captions_by_one():
    cfg = ValidationConfig(min_captions=3)
    raw = {"short": ["one cat", "two cats"], "dense": None}
    assert clean_captions(raw, FIELDS, cfg, Counter(), frozenset({"dense"}))["dense"] == []
    with pytest.raises(SampleRejected) as rej:
        clean_captions({"short": ["one cat"]}, FIELDS, cfg, Counter(), frozenset({"dense"}))
    assert rej.value.reason == R.TOO_FEW_CAPTIONS and "lowered from 3" in rej.value.detail


def test_optional_captions_config_is_checked():
    with pytest.raises(ConfigError, match="optional_captions"):
        ManifestSource(caption_columns={"short": "c"}, optional_captions=("dense",))
    with pytest.raises(ConfigError, match="at least one must stay required"):
        WebDatasetSource(caption_fields={"short": "txt"}, optional_captions=("short",))
    params = load_params(None, ["prepare_data.sources=[{kind: manifest, path: m.csv, caption_columns: "
                                "{short: c, dense: d}, optional_captions: [dense], encoding: latin-1}]"])
    (src,) = params.prepare_data.sources
    assert src.optional_captions == ("dense",) and src.encoding == "latin-1"


def test_the_first_caption_field_cannot_be_optional():
    src = WebDatasetSource(urls="x.tar", caption_fields={"short": "txt", "dense": "json:d"},
                           optional_captions=("short",))
    with pytest.raises(StageError, match=r"'short' is the first of common.caption_fields"):
        check_caption_mapping((src,), FIELDS)
    check_caption_mapping((src,), ("dense", "short"))


def test_optional_webdataset_field_missing_from_the_json(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("1.jpg", B.good_jpeg()), ("1.txt", b"a cat"), ("1.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = WebDatasetSource(urls=str(tmp_path / "s.tar"), caption_fields={"short": "txt", "dense": "json:long"},
                           optional_captions=("dense",))
    (raw,) = iter_webdataset(src)
    record, _ = validate(raw)
    assert record.captions == {"short": ["a cat"], "dense": []}


# ------------------------------------------------- defect 4: missing manifest, giant fields


def test_a_manifest_that_does_not_exist_is_a_stage_error_naming_the_path(tmp_path):
    src = ManifestSource(name="coco", path=str(tmp_path / "nope" / "captions.csv"))
    with pytest.raises(StageError, match=r"nope/captions\.csv does not exist"):
        list(iter_manifest(src))
    with pytest.raises(StageError, match=r"sources\[0\] \(coco\).*captions\.csv"):
        check_caption_mapping((src,), ("short",))


def test_a_caption_above_the_csv_field_limit_is_read_then_truncated(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg")
    giant = "word " * 60_000  # 300 000 characters > csv's default 131 072
    (tmp_path / "m.csv").write_text(f'image,caption\na.jpg,"{giant}"\nb.jpg,a short one\n')
    a, b = iter_manifest(ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "caption"}))
    record, stats = validate(a, ("short",), ValidationConfig(min_captions=1))
    assert len(record.captions["short"][0]) <= VALID.max_caption_chars and stats["captions_truncated"] == 1
    assert record.captions["short"][0] == ("word " * 400).strip()
    assert b.captions["short"] == ["a short one"]


# ------------------------------------------------------------------- defect 8: encodings

LATIN = "image,caption\na.jpg,un café crème à Noël\nb.jpg,\u201cnaïve\u201d façade\n"


def read_captions(path, **kw) -> list:
    src = ManifestSource(path=str(path), caption_columns={"short": "caption"}, **kw)
    return [s.error[0] if s.error else s.captions["short"][0] for s in iter_manifest(src)]


def test_a_cp1252_csv_is_detected_warned_about_and_never_replaced(tmp_path, caplog):
    images(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "m.csv").write_bytes(LATIN.encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        caps = read_captions(tmp_path / "m.csv")
    assert caps == ["un café crème à Noël", "\u201cnaïve\u201d façade"]
    assert "\ufffd" not in "".join(caps)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "not UTF-8" in warning and "cp1252" in warning and "8 non-ASCII" in warning


def test_explicit_encoding_and_byte_order_marks(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "l.csv").write_bytes(LATIN.encode("cp1252"))
    (tmp_path / "bom.csv").write_bytes(codecs.BOM_UTF8 + LATIN.encode("utf-8"))
    (tmp_path / "u16.csv").write_bytes(LATIN.encode("utf-16"))
    want = ["un café crème à Noël", "\u201cnaïve\u201d façade"]
    assert read_captions(tmp_path / "l.csv", encoding="cp1252") == want
    assert read_captions(tmp_path / "bom.csv") == read_captions(tmp_path / "u16.csv") == want
    assert read_captions(tmp_path / "bom.csv", encoding="utf-8") == want  # the BOM is no column name


def test_undecodable_rows_are_quarantined_with_their_line_and_counted(tmp_path, caplog):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    data = "image,caption\na.jpg,déjà vu\n".encode() + b"b.jpg,caf\xe9\nc.jpg,plain\n"
    (tmp_path / "m.csv").write_bytes(data)  # valid UTF-8 elsewhere: not a Latin-1 file
    with caplog.at_level(logging.WARNING):
        caps = read_captions(tmp_path / "m.csv")
    assert caps == ["déjà vu", R.BAD_ENCODING, "plain"]
    (bad,) = [s for s in iter_manifest(ManifestSource(path=str(tmp_path / "m.csv"))) if s.error]
    assert bad.line == 3 and "0xe9" in bad.error[1] and "encoding" in bad.error[1]
    assert any("1 byte(s) are not valid utf-8" in r.getMessage() for r in caplog.records)
    assert read_captions(tmp_path / "m.csv", encoding="utf-8")[1] == R.BAD_ENCODING


def test_a_latin1_jsonl_is_read_too_and_unknown_encodings_are_config_errors(tmp_path):
    images(tmp_path, "a.jpg")
    (tmp_path / "m.jsonl").write_bytes('{"image": "a.jpg", "caption": "crème brûlée"}\n'.encode("latin-1"))
    assert read_captions(tmp_path / "m.jsonl") == ["crème brûlée"]
    with pytest.raises(ConfigError, match="unknown encoding 'utf9'"):
        ManifestSource(encoding="utf9")


def test_unicode_line_separator_inside_a_jsonl_string_is_data_not_a_line_break(tmp_path):
    images(tmp_path, "a.jpg")
    line = json.dumps({"image": "a.jpg", "caption": "left\u2028right"}, ensure_ascii=False)
    (tmp_path / "m.jsonl").write_text(line + "\n", encoding="utf-8")
    assert read_captions(tmp_path / "m.jsonl") == ["left\u2028right"]
