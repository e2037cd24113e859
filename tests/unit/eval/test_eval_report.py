"""Report writers: JSON metrics, recall plots (CSV/JSON/PNG) and the Markdown + HTML report, parsed back."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.eval.report import (
    ReportSection,
    flatten_metrics,
    write_metrics_json,
    write_recall_plots,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_metrics_json_roundtrip(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    written = write_metrics_json(path, {
        "image_to_text_R_at_1": 0.5,
        "count": 3,
        "np": np.float32(0.25),
        "tensor": torch.tensor(0.125),
        "coco": {"short": {"top1": 0.75}},
    })
    data = json.loads(path.read_text())
    assert data == written == {
        "image_to_text_R_at_1": 0.5, "count": 3.0, "np": 0.25, "tensor": 0.125, "coco/short/top1": 0.75,
    }
    assert all(type(v) is float for v in data.values())
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, None, "0.5", [1.0]])
def test_metrics_json_rejects_non_numbers(tmp_path, bad):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match="x"):
        write_metrics_json(path, {"x": bad})
    assert not path.exists()
    assert flatten_metrics({}) == {}


def test_recall_plots_parse_back(tmp_path):
    curves = {"image_to_text": [0.5, 0.75, 1.0], "text_to_image": [0.25, 0.5, 0.5]}
    paths = write_recall_plots(tmp_path / "plots", curves)
    assert set(paths) == {"csv", "json", "png"}
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["k", "recall", "direction"]
        rows = list(reader)
    assert len(rows) == 6
    assert rows[0] == {"k": "1", "recall": "0.5", "direction": "image_to_text"}
    assert [float(r["recall"]) for r in rows if r["direction"] == "text_to_image"] == [0.25, 0.5, 0.5]
    records = json.loads(paths["json"].read_text())
    assert records[-1] == {"k": 3, "recall": 0.5, "direction": "text_to_image"}
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    pixels = matplotlib.image.imread(paths["png"])
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something was drawn
    assert leftovers(paths["png"].parent) == []


class TableParser(HTMLParser):
    """Collects tables (rows of (text, class) cells), headings and image sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.h2, self.imgs = [], [], []
        self._cell = self._tag = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", attrs.get("class", "")]
        elif tag == "img":
            self.imgs.append(attrs["src"])
        self._tag = tag

    def handle_endtag(self, tag):
        self._tag = None
        if tag in ("td", "th"):
            self.tables[-1][-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        elif self._tag == "h2":
            self.h2.append(data)


def test_report_markdown_and_html(tmp_path):
    plot = write_recall_plots(tmp_path / "plots", {"image_to_text": [0.5, 1.0]})["png"]
    sections = [
        ReportSection(
            eval_set="coco-5k", caption_type="short",
            metrics={"multi_image_to_text_R_at_1": 0.6, "multi_image_to_text_mean_rank": 3.0},
            comparisons={
                "champion": {"multi_image_to_text_R_at_1": 0.55, "multi_image_to_text_mean_rank": 2.0},
                "baseline": {"multi_image_to_text_R_at_1": 0.6},
            },
            plot=plot, notes="5 captions per image",
        ),
        {"eval_set": "<imagenet>", "metrics": {"top1": 0.7}, "comparisons": {"champion": {"top5": 0.9}}},
    ]
    md, page = tmp_path / "report" / "report.md", tmp_path / "report" / "report.html"
    write_report(md, page, sections, title="eval", meta={"model": "m|1", "git": "abc"})

    text = md.read_text()
    assert "## coco-5k / short" in text and "## <imagenet>" in text
    assert "| metric | candidate | champion | Δ vs champion | baseline | Δ vs baseline |" in text
    assert "| multi_image_to_text_R_at_1 | 0.6000 | 0.5500 | +0.0500 | 0.6000 | +0.0000 |" in text
    assert "| multi_image_to_text_mean_rank | 3.0000 | 2.0000 | +1.0000 | — | — |" in text
    assert "| top5 | — | 0.9000 | — |" in text
    assert "| model | m\\|1 |" in text
    assert "![coco-5k / short recall](../plots/recall.png)" in text
    assert (md.parent / "../plots/recall.png").resolve() == plot.resolve()

    parser = TableParser()
    parser.feed(page.read_text())
    assert parser.h2 == ["coco-5k / short", "<imagenet>"]  # escaped in the source, text after parsing
    assert "<h2>&lt;imagenet&gt;</h2>" in page.read_text()
    meta, coco, imagenet = parser.tables
    assert meta == [[("model", ""), ("m|1", "")], [("git", ""), ("abc", "")]]
    header = [c[0] for c in coco[0]]
    assert header == ["metric", "candidate", "champion", "Δ vs champion", "baseline", "Δ vs baseline"]
    r_at_1, mean_rank = coco[1], coco[2]
    assert r_at_1[3] == ("+0.0500", "better")
    assert r_at_1[5] == ("+0.0000", "")  # equal: neither
    assert mean_rank[3] == ("+1.0000", "worse")  # a higher rank is worse
    assert imagenet[1][0][0] == "top1" and imagenet[2][0][0] == "top5"
    assert len(parser.imgs) == 1 and parser.imgs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(parser.imgs[0].split(",", 1)[1]) == plot.read_bytes()
    assert leftovers(md.parent) == []


def test_report_section_coercion_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        write_report(tmp_path / "r.md", tmp_path / "r.html", [{"eval_set": "x", "metric": {}}])
    assert ReportSection.coerce({"eval_set": "flickr"}).title == "flickr"
