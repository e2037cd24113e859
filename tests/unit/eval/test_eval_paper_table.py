"""The paper-layout table: which columns appear, the average, the reference rows, and the paper's
published row (present for an import of a released checkpoint, absent for any other model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llm2clip.contracts import write_manifest
from llm2clip.eval.paper_table import RETRIEVAL, SetSummary, build_paper_table
from llm2clip.eval.published import load_published, match_release
from llm2clip.eval.report import write_report
from llm2clip.stages.evaluate import _published_for


def retrieval(name: str, i2t: float, t2i: float) -> dict[str, float]:
    return {f"{name}.headline.image_to_text_R_at_1": i2t, f"{name}.headline.text_to_image_R_at_1": t2i}


def test_columns_come_from_the_sets_and_the_rest_are_left_out():
    sets = [SetSummary("val", "val", "one_to_one", "short", 18),
            SetSummary("coco", "coco", "multi_caption", "captions"),
            SetSummary("in1k", "imagenet"), SetSummary("cn", "crosslingual", "one_to_one", "zh")]
    metrics = {**retrieval("coco", 0.5, 0.25), **retrieval("val", 0.1, 0.2), "val.zeroshot.top1": 0.3,
               "in1k.zeroshot.top1": 0.75, **retrieval("cn", 0.02, 0.04), "coco.zeroshot.top1": 0.9}
    table = build_paper_table(sets, {"this model": metrics})
    assert [c.title for c in table.columns] == [
        "COCO I2T", "COCO T2I", "ImageNet top-1", "Cross-lingual I2T", "Cross-lingual T2I",
        "val I2T", "val T2I", "val top-1"]  # the paper's order, then the others; no zero-shot under COCO
    assert [c.paper for c in table.columns[:5]] == ["coco", "coco", "imagenet", "crosslingual", "crosslingual"]
    assert table.rows == [("this model", {"coco.i2t": 50.0, "coco.t2i": 25.0, "imagenet.top1": 75.0,
                                          "crosslingual.i2t": 2.0, "crosslingual.t2i": 4.0, "val.i2t": 10.0,
                                          "val.t2i": 20.0, "val.top1": 30.0})]
    assert table.published is None and not any(name.startswith("paper") for name, _ in table.rows)
    md = "\n".join(table.markdown())
    assert "| this model | 50.0 | 25.0 | 75.0 |" in md and "Flickr30k" not in md and "Avg" not in md


def test_average_of_the_five_and_of_fewer():
    sets = [SetSummary(n, n, "one_to_one", "c") for n in RETRIEVAL]
    metrics = {k: v for i, n in enumerate(RETRIEVAL) for k, v in retrieval(n, 0.1 * (i + 1), 0.05 * (i + 1)).items()}
    table = build_paper_table(sets, {"this model": metrics})
    titles = [c.title for c in table.columns]
    assert titles[-2:] == ["Avg I2T", "Avg T2I"] and titles[0] == "Flickr30k I2T"
    values = table.rows[0][1]
    assert values["average.i2t"] == pytest.approx(30.0) and values["average.t2i"] == pytest.approx(15.0)
    partial = build_paper_table(sets[:2] + [SetSummary("in1k", "imagenet")],
                                {"this model": {**metrics, "in1k.zeroshot.top1": 0.5}})
    assert [c.title for c in partial.columns] == ["Flickr30k I2T", "Flickr30k T2I", "COCO I2T", "COCO T2I",
                                                  "Avg of 2/5 I2T", "Avg of 2/5 T2I", "ImageNet top-1"]
    assert partial.rows[0][1]["average.i2t"] == pytest.approx(15.0)


def test_reference_rows_and_sets_sharing_a_label():
    sets = [SetSummary("coco_cn", "crosslingual", "one_to_one", "zh"),
            SetSummary("flickr_cn", "crosslingual", "one_to_one", "zh")]
    mine = {**retrieval("coco_cn", 0.5, 0.5), **retrieval("flickr_cn", 0.6, 0.4)}
    table = build_paper_table(sets, {"this model": mine, "baseline": retrieval("coco_cn", 0.1, 0.2),
                                     "champion": {"val.mean_R_at_1": 0.3}})
    assert [c.title for c in table.columns] == ["Cross-lingual (coco_cn) I2T", "Cross-lingual (coco_cn) T2I",
                                                "Cross-lingual (flickr_cn) I2T", "Cross-lingual (flickr_cn) T2I"]
    # the champion has none of these numbers: no row; the baseline's missing cells stay empty, not zero
    assert [name for name, _ in table.rows] == ["this model", "baseline"]
    assert table.rows[1][1]["crosslingual/flickr_cn.i2t"] is None
    assert "| baseline | 10.0 | 20.0 | — | — |" in "\n".join(table.markdown())


def test_small_caption_encoder_gets_the_cross_lingual_note():
    sets = [SetSummary("de", "crosslingual", "one_to_one", "de")]
    small = build_paper_table(sets, {"this model": retrieval("de", 0.01, 0.02)}, llm_dim=576)
    large = build_paper_table(sets, {"this model": retrieval("de", 0.01, 0.02)}, llm_dim=4096)
    assert any("low cross-lingual numbers are expected" in n for n in small.notes)
    assert not any("cross-lingual numbers" in n for n in large.notes)


# ----------------------------------------------------------------------------- published numbers


def test_the_published_file_holds_numbers_with_table_references():
    models = {m.name: m for m in load_published()}
    assert set(models) == {"LLM2CLIP-Openai-L-14-336", "LLM2CLIP-EVA02-L-14-336"}
    for m in models.values():
        for numbers in m.numbers:
            assert numbers.reference.startswith("arXiv:2411.04997v6 Table ")
            assert all(0 < v <= 100 for metrics in numbers.columns.values() for v in metrics.values())
    openai = models["LLM2CLIP-Openai-L-14-336"]
    assert openai.value("coco", "i2t")[0] == 68.5 and "Table 1" in openai.value("coco", "i2t")[1]
    assert openai.value("imagenet", "top1")[0] == 75.8 and "Table 3" in openai.value("imagenet", "top1")[1]
    assert openai.value("crosslingual", "i2t") is None  # the paper prints none for this model
    assert models["LLM2CLIP-EVA02-L-14-336"].value("imagenet", "top1") is None


def vision_dir(path, imported_from=None):
    """A vision model dir's manifest, written through the train_vision contract."""
    body = {"config_hash": None, "model": {}, "training": None, "inputs": {}, "val_protocol": None, "files": {}}
    write_manifest("train_vision", path, body | ({"imported_from": imported_from} if imported_from else {}))
    return str(path)


def model_of(size: int):
    return SimpleNamespace(tower=SimpleNamespace(preprocess=SimpleNamespace(image_size=size)))


@pytest.mark.parametrize("source", ["/snapshots/LLM2CLIP-Openai-L-14-336",
                                    "/hf/hub/models--microsoft--LLM2CLIP-Openai-L-14-336/snapshots/0a1b"])
def test_an_imported_release_gets_the_published_row(tmp_path, source):
    model_dir = vision_dir(tmp_path / "vision", {"kind": "openai-vit", "source": source, "release": None})
    published = _published_for(model_dir, model_of(336), "")
    assert published is not None and published.name == "LLM2CLIP-Openai-L-14-336"
    sets = [SetSummary("coco", "coco", "multi_caption", "captions", 5000), SetSummary("in1k", "imagenet"),
            SetSummary("cn", "crosslingual", "one_to_one", "zh"), SetSummary("val", "val", "one_to_one", "short")]
    metrics = {**retrieval("coco", 0.6, 0.5), "in1k.zeroshot.top1": 0.7, **retrieval("cn", 0.5, 0.4),
               **retrieval("val", 0.3, 0.3)}
    table = build_paper_table(sets, {"this model": metrics}, published=published)
    name, values = table.rows[-1]
    assert name == "paper: LLM2CLIP-Openai-L-14-336"
    assert values == {"coco.i2t": 68.5, "coco.t2i": 54.8, "imagenet.top1": 75.8, "crosslingual.i2t": None,
                      "crosslingual.t2i": None, "val.i2t": None, "val.t2i": None}
    assert table.published["references"] == [
        "arXiv:2411.04997v6 Table 1, ViT-L/14 block, row 'CLIP (Radford et al. 2021) 336' -> '+LLM2CLIP-60M 336'",
        "arXiv:2411.04997v6 Table 3, row 'CLIP L/14-336' -> '+LLM2CLIP', column '0-shot'"]
    assert any(n.startswith("paper row: LLM2CLIP-Openai-L-14-336") for n in table.notes)
    # the paper's Avg only beside a complete one: here only COCO is present, so no Avg column at all
    assert not any(c.group == "average" for c in table.columns)


def test_no_published_row_for_any_other_model(tmp_path):
    trained = vision_dir(tmp_path / "trained")  # trained here: no imported_from
    assert _published_for(trained, model_of(336), "") is None
    openai = {"kind": "openai-vit", "source": "/snap/LLM2CLIP-Openai-L-14-336"}
    assert _published_for(vision_dir(tmp_path / "b16", openai), model_of(224), "") is None  # another size
    renamed = {"kind": "openai-vit", "source": "/snap/my-clip"}
    assert _published_for(vision_dir(tmp_path / "renamed", renamed), model_of(336), "") is None
    assert match_release({"kind": "eva02", "source": "/snap/LLM2CLIP-Openai-L-14-336"}, 336) is None  # wrong kind
    assert match_release({"kind": "openai-vit", "source": "/x", "release": "microsoft/LLM2CLIP-Openai-L-14-336"},
                         336).name == "LLM2CLIP-Openai-L-14-336"
    # a model dir whose manifest predates the contract: not an import either
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"stage": "train_vision"}))
    assert _published_for(str(tmp_path / "old"), model_of(336), "") is None


def test_the_published_average_stands_only_beside_all_five(tmp_path):
    published = match_release({"kind": "eva02", "source": "/s/LLM2CLIP-EVA02-L-14-336"}, 336)
    sets = [SetSummary(n, n, "one_to_one", "c") for n in RETRIEVAL]
    metrics = {k: v for n in RETRIEVAL for k, v in retrieval(n, 0.5, 0.5).items()}
    full = build_paper_table(sets, {"this model": metrics}, published=published)
    paper = dict(full.rows)["paper: LLM2CLIP-EVA02-L-14-336"]
    assert paper["average.i2t"] == 91.0 and paper["docci.t2i"] == 92.6 and paper["flickr30k.i2t"] == 95.9
    fewer = build_paper_table(sets[:3], {"this model": metrics}, published=published)
    assert dict(fewer.rows)["paper: LLM2CLIP-EVA02-L-14-336"]["average.i2t"] is None


def test_the_report_shows_the_table_and_json_round_trips(tmp_path):
    table = build_paper_table([SetSummary("coco", "coco", "multi_caption", "captions")],
                              {"this model": retrieval("coco", 0.5, 0.25)})
    write_report(tmp_path / "r.md", tmp_path / "r.html", [{"eval_set": "coco", "metrics": {"a": 1.0}}],
                 paper_table=table)
    md, page = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    assert "## In the paper's layout" in md and "| model | COCO I2T | COCO T2I |" in md
    assert md.index("In the paper's layout") < md.index("## coco")
    assert "<th>COCO I2T</th>" in page and "<td>50.0</td>" in page
    dumped = json.loads(json.dumps(table.to_json()))
    assert dumped["unit"] == "percent" and dumped["rows"][0]["values"] == {"coco.i2t": 50.0, "coco.t2i": 25.0}
