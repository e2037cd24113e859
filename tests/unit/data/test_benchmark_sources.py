"""Benchmark sources on tiny fixtures in each set's exact public layout (see benchmark_fixtures)."""

from __future__ import annotations

import json

import benchmark_fixtures as F
import pytest

from llm2clip.config import (
    CaptionTableSource,
    CommonConfig,
    ConfigError,
    ImageNetSource,
    KarpathySource,
    LongCaptionSource,
    from_dict,
)
from llm2clip.config.prepare_data import PrepareDataConfig
from llm2clip.data import records as R
from llm2clip.data.sources import SOURCE_READERS, check_caption_mapping, open_source
from llm2clip.io import StageError


def read(src, fields=("captions",)):
    reader = open_source(src, CommonConfig(caption_fields=fields, tracking=False))
    samples = list(reader.samples)
    assert reader.total == len(samples)
    return samples


def by_key(samples):
    return {s.key: s for s in samples}


def test_every_benchmark_kind_has_a_reader_and_loads_from_params():
    for kind in ("karpathy", "long_caption", "imagenet", "caption_table"):
        assert kind in SOURCE_READERS
    cfg = from_dict(PrepareDataConfig, {"sources": [
        {"kind": "karpathy", "name": "coco", "path": "d.json"},
        {"kind": "long_caption", "name": "urban", "layout": "urban1k", "path": "Urban1k"},
        {"kind": "imagenet", "name": "in1k", "layout": "val_csv", "path": "LOC_val_solution.csv"},
        {"kind": "caption_table", "name": "cn", "header": False, "image_column": 0, "caption_column": 1},
    ]})
    assert [type(s) for s in cfg.sources] == [KarpathySource, LongCaptionSource, ImageNetSource, CaptionTableSource]
    assert cfg.sources[3].caption_column == 1


# ------------------------------------------------------------------------------- karpathy


def test_karpathy_coco_test_split_keeps_five_captions_in_order(tmp_path):
    path = F.karpathy_coco(tmp_path)
    samples = by_key(read(KarpathySource(name="coco", path=str(path))))
    assert sorted(samples) == ["coco-391895", "coco-522418"]  # val and restval left out
    first = samples["coco-391895"]
    assert first.captions == {"captions": F.COCO_SENTENCES[:5]} and first.error is None
    assert first.image[:2] == b"\xff\xd8" and first.source_id.endswith("val2014/COCO_val2014_000000391895.jpg")
    everything = by_key(read(KarpathySource(name="coco", path=str(path), max_captions=0)))
    assert everything["coco-391895"].captions["captions"] == F.COCO_SENTENCES


def test_karpathy_other_splits_and_a_missing_image(tmp_path):
    path = F.karpathy_coco(tmp_path, missing_image=True)
    (restval,) = read(KarpathySource(name="coco", path=str(path), split="restval", image_root=str(tmp_path)))
    assert restval.key == "coco-9" and restval.error is None
    missing = by_key(read(KarpathySource(name="coco", path=str(path))))["coco-42"]
    assert missing.error[0] == R.MISSING_IMAGE and "COCO_val2014_000000000042.jpg" in missing.error[1]


def test_karpathy_flickr30k_has_no_filepath_and_keys_by_imgid(tmp_path):
    path = F.karpathy_flickr(tmp_path)
    src = KarpathySource(name="flickr30k", path=str(path), image_root=str(tmp_path / "flickr30k-images"))
    samples = read(src)
    assert [s.key for s in samples] == ["flickr30k-0", "flickr30k-2"]
    assert samples[0].captions["captions"][0] == "Caption 0 of image 1000092795.jpg." and samples[0].error is None


@pytest.mark.parametrize("damage, named", [
    (lambda doc: doc.pop("images"), "'images'"),
    (lambda doc: doc["images"][1].pop("sentences"), "images[1] has no 'sentences'"),
    (lambda doc: doc["images"][0]["sentences"][2].pop("raw"), "images[0].sentences[2] has no 'raw'"),
    (lambda doc: doc["images"][0].pop("filename"), "images[0] has no 'filename'"),
])
def test_karpathy_wrong_layout_is_one_clear_error(tmp_path, damage, named):
    path = F.karpathy_coco(tmp_path)
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(StageError, match="Karpathy") as err:
        read(KarpathySource(name="coco", path=str(path)))
    assert named in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_karpathy_missing_file_names_it(tmp_path):
    with pytest.raises(StageError, match="dataset_coco.json not found"):
        read(KarpathySource(name="coco", path=str(tmp_path / "dataset_coco.json")))


# --------------------------------------------------------------------------- long captions


def test_sharegpt4v_takes_the_first_gpt_turn_and_the_first_n(tmp_path):
    path = F.sharegpt4v(tmp_path)
    samples = read(LongCaptionSource(name="sharegpt4v", path=str(path)), ("long",))
    assert [s.key for s in samples] == ["sharegpt4v-sa_545504", "sharegpt4v-000000000009", "sharegpt4v-sa_1"]
    assert samples[0].captions == {"long": ["The image shows a long street with old houses and trees."]}
    assert samples[1].error is None and samples[1].source_id.endswith("coco/train2017/000000000009.jpg")
    assert samples[2].error[0] == R.MISSING_CAPTION and "no 'gpt' turn" in samples[2].error[1]
    assert len(read(LongCaptionSource(name="s", path=str(path), limit=2), ("long",))) == 2
    assert LongCaptionSource(layout="sharegpt4v").resolved_limit == 1000  # ShareGPT4V-1k


def test_sharegpt4v_entry_without_conversations_names_the_key(tmp_path):
    path = F.sharegpt4v(tmp_path)
    data = json.loads(path.read_text())
    del data[1]["conversations"]
    path.write_text(json.dumps(data))
    with pytest.raises(StageError, match=r"entry \[1\] has no 'conversations' key"):
        read(LongCaptionSource(name="s", path=str(path)), ("long",))


def test_urban1k_pairs_image_and_caption_by_number(tmp_path):
    root = F.urban1k(tmp_path)
    samples = read(LongCaptionSource(name="urban1k", layout="urban1k", path=str(root)), ("long",))
    assert [s.key for s in samples] == ["urban1k-1", "urban1k-2", "urban1k-10"]  # numeric order
    assert samples[1].captions == {"long": ["A busy city street number 2, with cars and people.\n"]}
    assert samples[2].error[0] == R.MISSING_IMAGE and "10.jpg" in samples[2].error[1]


def test_urban1k_without_caption_folder_names_it(tmp_path):
    (tmp_path / "Urban1k" / "image").mkdir(parents=True)
    with pytest.raises(StageError, match=r"Urban1k/caption not found; expected the Urban1k folder"):
        read(LongCaptionSource(name="u", layout="urban1k", path=str(tmp_path / "Urban1k")), ("long",))


def test_docci_filters_the_split(tmp_path):
    path = F.docci(tmp_path)
    test = read(LongCaptionSource(name="docci", layout="docci", path=str(path)), ("long",))
    assert [s.key for s in test] == ["docci-test_00001", "docci-test_00002"] and test[0].error is None
    assert test[0].captions["long"] == ["A detailed description of test_00001, its objects and colours."]
    every = read(LongCaptionSource(name="docci", layout="docci", path=str(path), split=""), ("long",))
    assert len(every) == 4
    first = read(LongCaptionSource(name="docci", layout="docci", path=str(path), limit=1), ("long",))
    assert [s.key for s in first] == ["docci-test_00001"]


def test_docci_line_without_a_key_names_line_and_key(tmp_path):
    path = F.docci(tmp_path)
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    del row["image_file"]
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines))
    with pytest.raises(StageError, match=r"docci_descriptions.jsonlines:3 has no 'image_file' key"):
        read(LongCaptionSource(name="d", layout="docci", path=str(path)), ("long",))


# ------------------------------------------------------------------------------- imagenet


def test_imagenet_folders_label_by_the_synset_mapping(tmp_path):
    root = F.imagenet_folders(tmp_path)
    samples = read(ImageNetSource(name="in1k", path=str(root)), ())
    assert [(s.key, s.label) for s in samples] == [
        ("in1k-n01440764-ILSVRC2012_val_00000293", "tench"), ("in1k-n01440764-ILSVRC2012_val_00002138", "tench"),
        ("in1k-n01443537-ILSVRC2012_val_00000236", "goldfish")]
    assert all(s.captions == {} and s.error is None for s in samples)
    limited = read(ImageNetSource(name="in1k", path=str(root), limit_per_class=1), ())
    assert [s.label for s in limited] == ["tench", "goldfish"]


def test_imagenet_folders_without_mapping_use_folder_names(tmp_path):
    root = F.imagenet_folders(tmp_path, mapping=False)
    assert {s.label for s in read(ImageNetSource(name="x", path=str(root)), ())} == {"n01440764", "n01443537"}


def test_imagenet_classnames_file_in_sorted_wnid_order(tmp_path):
    root = F.imagenet_folders(tmp_path)
    names = tmp_path / "openai_classnames.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")  # one per wnid of the mapping
    samples = read(ImageNetSource(name="x", path=str(root), classnames_file=str(names)), ())
    assert [s.label for s in samples] == ["tench", "tench", "goldfish"]
    names.write_text("tench fish\ngold fish\n")
    with pytest.raises(StageError, match=r"openai_classnames.txt has 2 class names, but the 3 wnids of"):
        read(ImageNetSource(name="x", path=str(root), classnames_file=str(names)), ())


def test_imagenet_val_csv(tmp_path):
    csv_path = F.imagenet_val_csv(tmp_path)
    samples = read(ImageNetSource(name="in1k", layout="val_csv", path=str(csv_path)), ())
    assert [(s.key, s.label, s.error and s.error[0]) for s in samples] == [
        ("in1k-n01440764-ILSVRC2012_val_00000001", "tench", None),
        ("in1k-n01440764-ILSVRC2012_val_00000002", "tench", None),
        ("in1k-n01443537-ILSVRC2012_val_00000003", "goldfish", None),
        ("in1k-n01484850-ILSVRC2012_val_00000004", "great white shark", R.MISSING_IMAGE)]
    limited = read(ImageNetSource(name="in1k", layout="val_csv", path=str(csv_path), limit_per_class=1), ())
    assert [s.key.split("-")[1] for s in limited] == ["n01440764", "n01443537", "n01484850"]


def test_imagenet_wrong_layouts_name_file_and_key(tmp_path):
    csv_path = F.imagenet_val_csv(tmp_path)
    csv_path.write_text("ImageId,Prediction\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    with pytest.raises(StageError, match=r"LOC_val_solution.csv: no column 'PredictionString'"):
        read(ImageNetSource(name="x", layout="val_csv", path=str(csv_path)), ())
    with pytest.raises(StageError, match=r"folder .*nowhere not found; expected class folders"):
        read(ImageNetSource(name="x", path=str(tmp_path / "nowhere")), ())
    root = F.imagenet_folders(tmp_path / "other")
    F.image(root / "n09999999" / "ILSVRC2012_val_00000007.JPEG")
    with pytest.raises(StageError, match=r"class 'n09999999' .* is not in .*LOC_synset_mapping.txt"):
        read(ImageNetSource(name="x", path=str(root)), ())


# -------------------------------------------------------------------------- caption tables


def test_flickr30k_cn_rows_merge_per_image_in_file_order(tmp_path):
    path = F.flickr30k_cn(tmp_path)
    src = CaptionTableSource(name="f30k_cn", path=str(path), header=False, image_column=0, caption_column=1,
                             image_pattern=r"^(?P<image>[^#]+)#", image_root=str(tmp_path / "flickr30k-images"),
                             caption_field="zh")
    samples = read(src, ("zh",))
    assert [s.key for s in samples] == ["f30k_cn-1000092795", "f30k_cn-10002456"]
    assert samples[0].captions == {"zh": ["两个年轻人在户外的一个院子里。", "两个男人站在院子里看着他们的手。"]}
    assert samples[0].error is None and samples[0].line == 1
    ids = tmp_path / "test_ids.txt"
    ids.write_text("1000092795\n")
    only = read(CaptionTableSource(**{**src.__dict__, "ids_file": str(ids)}), ("zh",))
    assert [s.key for s in only] == ["f30k_cn-1000092795"]


def test_coco_cn_ids_get_a_suffix_and_the_split_file_filters(tmp_path):
    table, split = F.coco_cn(tmp_path)
    src = CaptionTableSource(name="coco_cn", path=str(table), image_column="image_id", image_suffix=".jpg",
                             ids_file=str(split), image_root=str(tmp_path / "val2014"), caption_field="zh")
    samples = read(src, ("zh",))
    assert [s.key for s in samples] == ["coco_cn-COCO_val2014_000000000192", "coco_cn-COCO_val2014_000000000208"]
    assert samples[1].captions == {"zh": ["一张图片的描述 2"]} and samples[1].error is None


def test_caption_table_jsonl_and_bad_rows(tmp_path):
    F.image(tmp_path / "a.jpg")
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg", "caption": ["eins", "zwei"]}\nnot json\n{"image": "b.jpg", "caption": "x"}\n')
    samples = read(CaptionTableSource(name="t", path=str(path), caption_field="de"), ("de",))
    assert [(s.key, s.error and s.error[0]) for s in samples] == [
        ("t-a", None), ("t-line-2", R.BAD_METADATA), ("t-b", R.MISSING_IMAGE)]
    assert samples[0].captions == {"de": ["eins", "zwei"]}


def test_caption_table_wrong_column_names_it(tmp_path):
    table, _ = F.coco_cn(tmp_path)
    with pytest.raises(StageError, match=r"coco-cn_captions.csv: no column 'image' in the header \['image_id'"):
        read(CaptionTableSource(name="t", path=str(table), caption_field="zh"), ("zh",))


def test_caption_table_config_checks():
    with pytest.raises(ConfigError, match="named group"):
        CaptionTableSource(image_pattern="^([^#]+)#")
    with pytest.raises(ConfigError, match="needs a header-less"):
        CaptionTableSource(image_column=0)
    with pytest.raises(ConfigError, match="0-based column index"):
        CaptionTableSource(header=False, image_column=0, caption_column="caption")


# ------------------------------------------------------------------ checks before the stage


def test_check_caption_mapping_for_benchmark_kinds(tmp_path):
    path = F.karpathy_coco(tmp_path)
    coco = KarpathySource(name="coco", path=str(path))
    check_caption_mapping((coco,), ("captions",))
    with pytest.raises(StageError, match=r"gives one caption field, 'captions'.*\['short', 'dense'\]"):
        check_caption_mapping((coco,), ("short", "dense"))
    with pytest.raises(StageError, match=r"set the source's caption_field to 'en'"):
        check_caption_mapping((coco,), ("en",))
    imagenet = ImageNetSource(name="in1k", path=str(F.imagenet_folders(tmp_path / "in")))
    check_caption_mapping((imagenet,), ())
    with pytest.raises(StageError, match=r"labels only, no caption field"):
        check_caption_mapping((imagenet,), ("captions",))
    with pytest.raises(StageError, match=r"path .*missing.json does not exist or is not a file"):
        check_caption_mapping((KarpathySource(name="c", path=str(tmp_path / "missing.json")),), ("captions",))
    with pytest.raises(StageError, match=r"path .*Urban1k does not exist or is not a folder"):
        check_caption_mapping((LongCaptionSource(layout="urban1k", path=str(tmp_path / "Urban1k")),), ("long",))
    with pytest.raises(StageError, match=r"ids_file .*nope.txt does not exist"):
        check_caption_mapping((CaptionTableSource(path=str(path), ids_file=str(tmp_path / "nope.txt")),),
                              ("caption",))


# -------------------------------------------------------------------------------------- s3


def test_benchmarks_read_from_s3(tmp_path, s3_bucket):
    from llm2clip.io import s3_filesystem

    endpoint, bucket = s3_bucket
    F.karpathy_coco(tmp_path)
    F.urban1k(tmp_path)
    F.imagenet_folders(tmp_path / "in")
    fs = s3_filesystem(endpoint)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            fs.put_file(str(p), f"s3://{bucket}/{p.relative_to(tmp_path).as_posix()}")
    common = CommonConfig(caption_fields=("captions",), tracking=False, s3_endpoint_url=endpoint)

    def keys(src, fields):
        reader = open_source(src, CommonConfig(**{**common.__dict__, "caption_fields": fields}))
        samples = list(reader.samples)
        assert all(s.error is None for s in samples if not s.key.endswith("-10"))
        return [s.key for s in samples]

    base = f"s3://{bucket}"
    assert keys(KarpathySource(name="coco", path=f"{base}/dataset_coco.json"), ("captions",)) == [
        "coco-391895", "coco-522418"]
    assert keys(LongCaptionSource(name="u", layout="urban1k", path=f"{base}/Urban1k"), ("long",)) == [
        "u-1", "u-2", "u-10"]
    labelled = open_source(ImageNetSource(name="in", path=f"{base}/in/val"), CommonConfig(
        caption_fields=(), tracking=False, s3_endpoint_url=endpoint))
    assert [s.label for s in labelled.samples] == ["tench", "tench", "goldfish"]  # mapping found next to val/
    check_caption_mapping((KarpathySource(name="coco", path=f"{base}/dataset_coco.json"),), ("captions",))
