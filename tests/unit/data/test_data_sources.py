"""Sources: demo generators (captions, determinism), manifests, webdataset shards local and S3."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import bad_inputs as B
import pytest
from PIL import Image

from llm2clip.config import CommonConfig, EmojiSource, ManifestSource, SyntheticSource, WebDatasetSource
from llm2clip.data import records as R
from llm2clip.data.emoji_source import candidates, font_problem, iter_emoji
from llm2clip.data.layout import plural
from llm2clip.data.sources import check_caption_mapping, iter_manifest, iter_webdataset, open_source
from llm2clip.data.synthetic import SHAPES, iter_synthetic
from llm2clip.io import StageError

FIELDS = ("short", "dense")
EMOJI_FONT = EmojiSource().font_path
needs_font = pytest.mark.skipif(font_problem(EMOJI_FONT) is not None, reason="no Noto Color Emoji font")


def fingerprint(samples) -> list:
    return [(s.key, s.captions, s.label, s.image.tobytes()) for s in samples]


# ------------------------------------------------------------------------------ generators


def test_synthetic_scenes_have_two_different_captions_and_a_shape_label():
    samples = list(iter_synthetic(SyntheticSource(count=30, image_size=64), 0, FIELDS))
    assert len(samples) == 30 and len({s.key for s in samples}) == 30
    for s in samples:
        assert s.image.size == (64, 64) and s.label in SHAPES
        assert s.captions["short"] != s.captions["dense"]
        assert s.label in s.captions["short"] or plural(s.label) in s.captions["short"]
        assert len(s.captions["dense"]) > len(s.captions["short"])


def test_synthetic_is_deterministic_by_seed():
    src = SyntheticSource(count=12, image_size=64)
    first, again = (fingerprint(iter_synthetic(src, 7, FIELDS)) for _ in range(2))
    other = fingerprint(iter_synthetic(src, 8, FIELDS))
    assert first == again and first != other


def test_extra_caption_fields_are_filled():
    (s,) = iter_synthetic(SyntheticSource(count=1, image_size=64), 0, ("short", "dense", "long"))
    assert set(s.captions) == {"short", "dense", "long"}


@needs_font
def test_emoji_scenes_have_two_captions_using_cldr_names():
    samples = list(iter_emoji(EmojiSource(count=12, image_size=64), 0, FIELDS))
    assert len(samples) == 12
    for s in samples:
        assert s.image.size == (64, 64) and s.label
        assert s.captions["short"] != s.captions["dense"]
        assert s.label in s.captions["dense"]  # the dense caption uses the CLDR name verbatim
        pixels = s.image.convert("L").getextrema()
        assert pixels[0] < pixels[1]  # not a blank picture


@needs_font
def test_emoji_is_deterministic_by_seed():
    src = EmojiSource(count=6, image_size=64)
    first, again = (fingerprint(iter_emoji(src, 3, FIELDS)) for _ in range(2))
    assert first == again and first != fingerprint(iter_emoji(src, 4, FIELDS))


def test_emoji_candidates_skip_skin_tones():
    names = [n for _, n in candidates()]
    tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    assert len(names) > 1000 and not any(tones & set(e) for e, _ in candidates())
    assert "red apple" in names


def test_missing_emoji_font_skips_the_source_with_a_clear_warning(caplog):
    src = EmojiSource(font_path="/nonexistent/NotoColorEmoji.ttf")
    with caplog.at_level(logging.WARNING):
        reader = open_source(src, CommonConfig())
    assert reader.skipped and "fonts-noto-color-emoji" in reader.skipped
    assert list(reader.samples) == []
    assert any(
        "fonts-noto-color-emoji" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


# ------------------------------------------------------------------------------ manifests


def test_csv_manifest_with_key_label_and_a_missing_image(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(B.good_jpeg())
    (tmp_path / "img" / "b.png").write_bytes(B.encode(B.noise_rgb(), "PNG"))
    (tmp_path / "m.csv").write_text(
        "id,path,s,d,cls\n1,img/a.jpg,a cat,a small grey cat,cat\n2,img/b.png,a dog,a dog on grass,\n"
        "3,img/gone.jpg,lost,a lost picture,x\n"
    )
    src = ManifestSource(
        path=str(tmp_path / "m.csv"),
        image_column="path",
        key_column="id",
        caption_columns={"short": "s", "dense": "d"},
        label_column="cls",
    )
    a, b, gone = iter_manifest(src)
    assert (a.key, a.captions, a.label) == (
        "manifest-1",
        {"short": ["a cat"], "dense": ["a small grey cat"]},
        "cat",
    )
    assert Image.open(io.BytesIO(a.image)).size == (96, 80)
    assert b.label is None and b.error is None
    assert gone.error[0] == R.MISSING_IMAGE and "gone.jpg" in gone.error[1]


def test_csv_manifest_missing_column_fails_early(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\nx.jpg,hello\n")
    src = ManifestSource(path=str(tmp_path / "m.csv"), caption_columns={"short": "caption", "dense": "long"})
    with pytest.raises(StageError, match=r"\['long'\] not found"):
        list(iter_manifest(src))


def test_jsonl_manifest_with_list_captions_and_a_broken_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(B.good_jpeg())
    lines = [
        json.dumps({"image": "a.jpg", "short": ["one", "two"], "dense": "long text"}),
        "{not json",
        json.dumps([1, 2]),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    src = ManifestSource(path=str(tmp_path / "m.jsonl"), caption_columns={"short": "short", "dense": "dense"})
    good, broken, not_object = iter_manifest(src)
    assert good.captions == {"short": ["one", "two"], "dense": ["long text"]} and good.key == "manifest-a"
    assert broken.error[0] == not_object.error[0] == R.BAD_METADATA


def test_caption_mapping_must_cover_common_fields():
    src = WebDatasetSource(urls="x.tar", caption_fields={"short": "txt"})
    with pytest.raises(StageError, match=r"missing: \['dense'\]"):
        check_caption_mapping((SyntheticSource(), src), FIELDS)
    check_caption_mapping((SyntheticSource(),), FIELDS)  # generators need no mapping


# ----------------------------------------------------------------------------- webdataset


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_members() -> list[tuple[str, bytes]]:
    return [
        ("000000001.jpg", B.good_jpeg()),
        ("000000001.txt", b"a cat on a mat"),
        (
            "000000001.json",
            json.dumps({"long": ["a grey cat sits on a red mat", "cat, mat"], "cls": 3}).encode(),
        ),
        ("000000002.webp", B.encode(B.noise_rgb(), "WEBP")),
        ("000000002.txt", b"noise"),
        ("000000002.json", b"{broken"),
        ("000000003.txt", b"caption without an image"),
    ]


WDS = {"short": "txt", "dense": "json:long"}


def test_local_webdataset_shard(tmp_path):
    write_tar(tmp_path / "shard-000000.tar", img2dataset_members())
    src = WebDatasetSource(
        urls=str(tmp_path / "shard-{000000..000000}.tar"), caption_fields=WDS, label_field="json:cls"
    )
    one, two, three = iter_webdataset(src)
    assert one.key == "webdataset-000000001" and one.label == "3"
    assert one.captions == {"short": "a cat on a mat", "dense": ["a grey cat sits on a red mat", "cat, mat"]}
    assert one.source_id.endswith("shard-000000.tar#000000001")
    assert two.error[0] == R.BAD_METADATA and three.error[0] == R.MISSING_IMAGE


def test_truncated_tar_keeps_what_was_read_and_reports_the_shard(tmp_path):
    write_tar(tmp_path / "full.tar", img2dataset_members() * 1)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    samples = list(iter_webdataset(WebDatasetSource(urls=str(tmp_path / "cut.tar"), caption_fields=WDS)))
    assert samples[-1].error[0] == R.UNREADABLE_SHARD
    assert samples[0].key == "webdataset-000000001" and samples[0].error is None


def test_s3_webdataset_shard(tmp_path, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    write_tar(tmp_path / "s.tar", img2dataset_members())
    boto3.client("s3", endpoint_url=endpoint).upload_file(str(tmp_path / "s.tar"), bucket, "wds/s-000.tar")
    src = WebDatasetSource(urls=f"s3://{bucket}/wds/s-{{000..000}}.tar", caption_fields=WDS)
    samples = list(iter_webdataset(src, endpoint))
    assert [s.key for s in samples] == [
        "webdataset-000000001",
        "webdataset-000000002",
        "webdataset-000000003",
    ]
    assert samples[0].image == img2dataset_members()[0][1]
