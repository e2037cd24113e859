"""The report's paper-layout table: one row per model, the columns of the LLM2CLIP paper's tables.

Columns, in the paper's order (arXiv 2411.04997v6 Tables 1-3): Flickr30k, COCO, ShareGPT4V,
Urban1k, DOCCI (I2T and T2I R@1 of each set's headline protocol), their average, ImageNet
(zero-shot top-1 over all stored templates), cross-lingual (I2T, T2I). An eval set lands in the
column its ``column`` names; a set with any other label gets extra columns after those (I2T/T2I
when it has captions, top-1 when it is labelled). A column no set fills is left out; several
sets with one label get one column group each. The average is over the five English retrieval
sets present (titled ``Avg of k/5`` when not all five are; the paper's own Avg only beside a
complete one).

Rows: the evaluated model, then its references (baseline, champion) where they have numbers,
then the paper's published numbers when the model is an import of a released checkpoint
(:mod:`llm2clip.eval.published`). Values are percent, as the paper prints them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm2clip.eval.published import PublishedModel

RETRIEVAL = ("flickr30k", "coco", "sharegpt4v", "urban1k", "docci")
PAPER_ORDER = (*RETRIEVAL, "average", "imagenet", "crosslingual")
TITLES = {"flickr30k": "Flickr30k", "coco": "COCO", "sharegpt4v": "ShareGPT4V", "urban1k": "Urban1k",
          "docci": "DOCCI", "average": "Avg", "imagenet": "ImageNet", "crosslingual": "Cross-lingual"}
METRIC_TITLES = {"i2t": "I2T", "t2i": "T2I", "top1": "top-1"}
METRIC_KEYS = {"i2t": "headline.image_to_text_R_at_1", "t2i": "headline.text_to_image_R_at_1",
               "top1": "zeroshot.top1"}
SMALL_LLM_DIM = 1024
CANDIDATE = "this model"


@dataclass(frozen=True)
class SetSummary:
    """What the table needs to know of one eval set.

    Attributes:
        name: The set's name (its metric prefix).
        column: Its column label (``EvalSet.column``, else its name).
        protocol: The resolved headline protocol (empty: no captions).
        caption_field: The headline's caption field.
        images: Images scored.
    """

    name: str
    column: str
    protocol: str = ""
    caption_field: str = ""
    images: int = 0


@dataclass(frozen=True)
class Column:
    """One column: ``key`` (``coco.i2t``), its group (``coco``), metric, title, and the set behind it."""

    key: str
    group: str
    metric: str
    title: str
    eval_set: str
    paper: str = ""  # the paper column it is (published numbers apply), else empty


@dataclass
class PaperTable:
    """The table, ready to render (:meth:`markdown`, :meth:`html`) or dump (:meth:`to_json`)."""

    columns: list[Column] = field(default_factory=list)
    rows: list[tuple[str, dict[str, float | None]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sets: list[SetSummary] = field(default_factory=list)
    published: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"unit": "percent", "columns": [vars(c) for c in self.columns],
                "rows": [{"name": name, "values": values} for name, values in self.rows],
                "sets": [vars(s) for s in self.sets], "published": self.published, "notes": self.notes}

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        header = ["model"] + [c.title for c in self.columns]
        body = [[name] + ["—" if values.get(c.key) is None else f"{values[c.key]:.1f}" for c in self.columns]
                for name, values in self.rows]
        return header, body

    def markdown(self) -> list[str]:
        """Markdown lines: the table, then its notes."""
        def esc(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        if not self.columns:
            return ["No eval set fills a column of the paper's tables."]
        header, body = self._cells()
        lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
        return lines + [""] + [f"- {esc(n)}" for n in self.notes]

    def html(self) -> str:
        """A standalone HTML fragment: the table, then its notes."""
        e = html.escape
        if not self.columns:
            return "<p>No eval set fills a column of the paper's tables.</p>"
        header, body = self._cells()
        parts = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
        parts.append("</table>")
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in self.notes) + "</ul>")
        return "\n".join(parts)


def _title(label: str) -> str:
    return TITLES.get(label, label)


def _groups(sets: Sequence[SetSummary]) -> list[tuple[str, str, SetSummary, str]]:
    """``(group key, title, set, paper label or "")`` per set, the paper's columns first."""
    by_label: dict[str, list[SetSummary]] = {}
    for s in sets:
        by_label.setdefault(s.column or s.name, []).append(s)
    groups = []
    for label, members in by_label.items():
        for s in members:
            single = len(members) == 1
            key, title = (label, _title(label)) if single else (f"{label}/{s.name}", f"{_title(label)} ({s.name})")
            groups.append((key, title, s, label if single and label in PAPER_ORDER else ""))
    order = {label: i for i, label in enumerate(PAPER_ORDER)}
    return sorted(groups, key=lambda g: order.get(g[0].split("/")[0], len(order)))  # stable: extras keep order


def _metrics_of(label: str) -> tuple[str, ...]:
    if label in RETRIEVAL or label == "crosslingual":
        return ("i2t", "t2i")
    return ("top1",) if label == "imagenet" else ("i2t", "t2i", "top1")


def _value(metrics: Mapping[str, float], set_name: str, metric: str) -> float | None:
    value = metrics.get(f"{set_name}.{METRIC_KEYS[metric]}")
    return None if value is None else 100.0 * float(value)


def _is_crosslingual(label: str) -> bool:
    flat = label.lower().replace("-", "").replace("_", "")
    return "crosslingual" in flat or "multilingual" in flat


def build_paper_table(sets: Sequence[SetSummary], runs: Mapping[str, Mapping[str, float]], *,
                      published: PublishedModel | None = None, llm_dim: int | None = None) -> PaperTable:
    """The paper-layout table of the evaluated model (the first of ``runs``) and its references.

    Args:
        sets: The eval sets, in config order.
        runs: Row name -> flat metrics (``<set>.headline.*``, ``<set>.zeroshot.top1``, ...); the
            first is the evaluated model and decides which columns exist.
        published: The released model the evaluated one is an import of (a published row).
        llm_dim: Width of the caption embeddings (a small caption encoder gets a note under a
            cross-lingual column).
    """
    names = list(runs)
    candidate = runs[names[0]] if names else {}
    table = PaperTable(sets=list(sets))
    retrieval_groups: list[str] = []
    for key, title, s, paper in _groups(sets):
        label = s.column or s.name
        for metric in _metrics_of(label):
            if _value(candidate, s.name, metric) is not None:
                table.columns.append(Column(f"{key}.{metric}", key, metric, f"{title} {METRIC_TITLES[metric]}",
                                            s.name, paper))
        if paper in RETRIEVAL and any(c.group == key for c in table.columns):
            retrieval_groups.append(key)
    rows = {name: {c.key: _value(runs[name], c.eval_set, c.metric) for c in table.columns} for name in names}
    if len(retrieval_groups) >= 2:
        _add_average(table, rows, retrieval_groups)
    for name in names:
        if name == names[0] or any(v is not None for v in rows[name].values()):
            table.rows.append((name, rows[name]))
    if published is not None:
        _add_published(table, published, complete=len(retrieval_groups) == len(RETRIEVAL))
    table.notes = _notes(table, sets, candidate, llm_dim)
    return table


def _add_average(table: PaperTable, rows: dict[str, dict[str, float | None]], groups: list[str]) -> None:
    title = "Avg" if len(groups) == len(RETRIEVAL) else f"Avg of {len(groups)}/5"
    after = max(i for i, c in enumerate(table.columns) if c.group in groups) + 1
    paper = "average" if len(groups) == len(RETRIEVAL) else ""
    new = [Column(f"average.{m}", "average", m, f"{title} {METRIC_TITLES[m]}", ",".join(groups), paper)
           for m in ("i2t", "t2i")]
    table.columns[after:after] = new
    for values in rows.values():
        for c in new:
            parts = [values.get(f"{g}.{c.metric}") for g in groups]
            values[c.key] = None if any(p is None for p in parts) else sum(parts) / len(parts)


def _add_published(table: PaperTable, model: PublishedModel, complete: bool) -> None:
    values: dict[str, float | None] = {}
    references: list[str] = []
    for c in table.columns:
        found = model.value(c.paper, c.metric) if c.paper and (c.paper != "average" or complete) else None
        values[c.key] = None if found is None else found[0]
        if found is not None and found[1] not in references:
            references.append(found[1])
    table.published = {"model": model.name, "release": model.release, "paper": model.paper,
                       "why_this_row": model.why_this_row, "references": references, "notes": model.notes()}
    table.rows.append((f"paper: {model.name}", values))


def _notes(table: PaperTable, sets: Sequence[SetSummary], metrics: Mapping[str, float],
           llm_dim: int | None) -> list[str]:
    notes = ["R@1 (retrieval, I2T = image->text) and top-1 (zero-shot) in percent."]
    shown = {c.eval_set for c in table.columns}
    for s in sets:
        if s.name not in shown:
            continue
        how = (f"{s.protocol} on caption field '{s.caption_field}'" if s.protocol else "no captions")
        single = metrics.get(f"{s.name}.zeroshot_single.top1")
        zs = f"; zero-shot over {int(metrics.get(f'{s.name}.zeroshot.templates', 0))} templates" \
            if f"{s.name}.zeroshot.top1" in metrics else ""
        zs += "" if single is None else f" (single template 'a photo of the {{}}.': {100 * single:.1f})"
        notes.append(f"{s.name} (column {s.column or s.name}): {s.images} images, {how}{zs}.")
    for s in sets:
        value = metrics.get(f"{s.name}.cra.R_at_1")
        if value is not None:
            notes.append(
                f"CRA on {s.name}: {100 * value:.1f} over {int(metrics[f'{s.name}.cra.pairs'])} caption pairs (the "
                "paper's definition: the first two captions of each image retrieve each other, top-1, on the tuned "
                "caption encoder's embeddings). Not caption_contrastive's CRA on the training data's val pairs; the "
                "paper's COCO 5.2 -> 29.5 (v6 Table A1) is before -> after caption-contrastive tuning, ours is after "
                "only (the base LLM's embeddings are not stored).")
    if table.published:
        refs = "; ".join(table.published["references"]) or "no column of this table"
        notes.append(f"paper row: {table.published['model']} ({table.published['release']}), {refs}. "
                     f"{table.published['why_this_row']}")
        notes += table.published["notes"]
    crosslingual = any(_is_crosslingual(c.group.split("/")[0]) for c in table.columns)
    if crosslingual and llm_dim is not None and llm_dim < SMALL_LLM_DIM:
        notes.append(f"The caption encoder is a small LLM ({llm_dim}-wide embeddings, like the demo's English "
                     "SmolLM2-135M): low cross-lingual numbers are expected. The paper's cross-lingual results come "
                     "from an 8B LLM's multilingual knowledge, not from multilingual training data.")
    return notes
