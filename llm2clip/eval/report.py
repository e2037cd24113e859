"""Evaluation outputs a person (and DVC) reads: metrics JSON, recall plots, a Markdown + HTML report.

Every file is written atomically (temp file + ``os.replace``, :mod:`llm2clip.io`), so a reader
never sees half a report.

* ``metrics.json``: a flat ``{name: float}`` dict (DVC metrics; nested input is flattened with
  ``/``).
* recall plots: ``<name>.csv`` and ``<name>.json`` with one row per ``(k, recall, direction)``
  (DVC plots data) and ``<name>.png`` (matplotlib, Agg canvas, no pyplot global state).
* report: the paper-layout table (:mod:`llm2clip.eval.paper_table`) when given, then one table
  per eval set and caption type, the candidate next to any references (champion, baseline, ...)
  with deltas ``candidate - reference``; the HTML is standalone, its plots embedded as base64.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2clip.eval.paper_table import PaperTable
from llm2clip.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PLOT_COLUMNS = ("k", "recall", "direction")


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise ValueError(f"metric {key!r} must be a number, got {value!r}")
    try:
        out = float(value)  # also numpy scalars and 0-dim tensors
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r} must be a number, got {value!r}") from e
    if not math.isfinite(out):
        raise ValueError(f"metric {key!r} is {out}; JSON metrics must be finite")
    return out


def flatten_metrics(metrics: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """``{"coco": {"top1": 0.5}}`` -> ``{"coco/top1": 0.5}``; values become finite floats.

    Raises:
        ValueError: a value that is not a finite number.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for sub, v in flatten_metrics(value, sep).items():
                out[f"{key}{sep}{sub}"] = v
        else:
            out[str(key)] = _to_float(str(key), value)
    return out


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Write DVC metrics: a flat JSON object of floats, keys sorted, atomically.

    Args:
        path: target file, e.g. ``<out>/metrics.json``.
        metrics: name -> number (nested mappings are flattened with ``/``).

    Returns:
        The flat dict that was written.
    """
    flat = flatten_metrics(metrics)
    atomic_write_json(path, flat)
    log.info("wrote %d metrics to %s", len(flat), path)
    return flat


def curve_rows(curves: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Long-format rows ``{"k", "recall", "direction"}``; ``curves[d][k - 1]`` is recall@k."""
    rows = []
    for direction, values in curves.items():
        for k, recall in enumerate(values, start=1):
            rows.append({"k": k, "recall": _to_float(f"{direction}@{k}", recall), "direction": direction})
    return rows


def _recall_png(curves: Mapping[str, Sequence[float]], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for direction, values in curves.items():
        ks = list(range(1, len(values) + 1))
        ax.plot(ks, [float(v) for v in values], marker="o" if len(ks) <= 20 else None,
                markersize=3, label=direction)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_recall_plots(
    directory: str | os.PathLike,
    curves: Mapping[str, Sequence[float]],
    *,
    name: str = "recall",
    title: str = "Retrieval recall@k",
) -> dict[str, Path]:
    """Write recall curves as DVC plots data (CSV and JSON) and a PNG.

    Args:
        directory: output directory (created if missing).
        curves: series name (a direction, e.g. ``image_to_text``, or ``coco/short/image_to_text``)
            -> [recall@1, ..., recall@K], as :func:`llm2clip.eval.retrieval.recall_curve` returns.
        name: file stem.
        title: plot title.

    Returns:
        ``{"csv": path, "json": path, "png": path}``.
    """
    directory = Path(directory)
    rows = curve_rows(curves)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PLOT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": directory / f"{name}.csv", "json": directory / f"{name}.json",
             "png": directory / f"{name}.png"}
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_json(paths["json"], rows)
    atomic_write_bytes(paths["png"], _recall_png(curves, title))
    log.info("wrote recall plots (%d series) to %s", len(curves), directory)
    return paths


@dataclass(frozen=True)
class ReportSection:
    """One table of the report: one eval set and caption type.

    Attributes:
        eval_set: e.g. ``coco-5k``, ``imagenet``.
        caption_type: e.g. ``short``, ``long``; empty when it does not apply.
        metrics: the candidate model's metrics.
        comparisons: reference name (``champion``, ``baseline``) -> its metrics on the same set.
        plot: optional PNG path shown under the table (embedded in the HTML).
        notes: a line of free text shown above the table.
    """

    eval_set: str
    caption_type: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    comparisons: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    plot: str | os.PathLike | None = None
    notes: str = ""

    @property
    def title(self) -> str:
        return f"{self.eval_set} / {self.caption_type}" if self.caption_type else self.eval_set

    @classmethod
    def coerce(cls, section: ReportSection | Mapping[str, Any]) -> ReportSection:
        """A ReportSection from itself or from a dict with the same keys (unknown key = error)."""
        if isinstance(section, ReportSection):
            return section
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown report section keys: {sorted(unknown)}")
        return cls(**section)


def lower_is_better(metric: str) -> bool:
    """Ranks and losses improve downwards; recalls and accuracies upwards."""
    return metric.endswith("_rank") or "loss" in metric


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_delta(delta: float | None) -> str:
    return "—" if delta is None else f"{delta:+.4f}"


def _table(section: ReportSection) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Header and rows of (text, css class) cells: metric, candidate, then (ref, delta) pairs."""
    refs = list(section.comparisons)
    header = ["metric", "candidate"]
    for ref in refs:
        header += [ref, f"Δ vs {ref}"]
    names = list(section.metrics)
    extra = {k for m in section.comparisons.values() for k in m} - set(names)
    names += sorted(extra)
    rows = []
    for name in names:
        cand = section.metrics.get(name)
        cand = None if cand is None else _to_float(name, cand)
        row = [(name, ""), (_fmt(cand), "")]
        for ref in refs:
            other = section.comparisons[ref].get(name)
            other = None if other is None else _to_float(name, other)
            delta = None if cand is None or other is None else cand - other
            css = ""
            if delta:
                improved = (delta < 0) if lower_is_better(name) else (delta > 0)
                css = "better" if improved else "worse"
            row += [(_fmt(other), ""), (_fmt_delta(delta), css)]
        rows.append(row)
    return header, rows


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


PAPER_HEADING = "In the paper's layout"


def _markdown(title: str, meta: Mapping[str, Any], sections: list[ReportSection], md_dir: Path,
              paper_table: PaperTable | None = None) -> str:
    lines = [f"# {title}", ""]
    if meta:
        lines += ["| | |", "|---|---|"] + [f"| {_md(k)} | {_md(v)} |" for k, v in meta.items()] + [""]
    if paper_table is not None:
        lines += [f"## {PAPER_HEADING}", ""] + paper_table.markdown() + [""]
    lines += ["Δ = candidate − reference. Higher is better except for `*_rank` and losses.", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.notes:
            lines += [s.notes, ""]
        header, rows = _table(s)
        lines += ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md(text) for text, _ in row) + " |" for row in rows]
        lines.append("")
        if s.plot:
            rel = os.path.relpath(Path(s.plot).resolve(), md_dir.resolve())
            lines += [f"![{s.title} recall]({Path(rel).as_posix()})", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; font-family: monospace; }
th { background: #f3f3f3; }
td.better { color: #067d17; } td.worse { color: #b00020; }
img { max-width: 100%; }
"""


def _html(title: str, meta: Mapping[str, Any], sections: list[ReportSection],
          paper_table: PaperTable | None = None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if meta:
        parts.append("<table>" + "".join(
            f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in meta.items()) + "</table>")
    if paper_table is not None:
        parts += [f"<h2>{e(PAPER_HEADING)}</h2>", paper_table.html()]
    parts.append("<p>Δ = candidate − reference. Higher is better except for <code>*_rank</code> "
                 "and losses.</p>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.notes:
            parts.append(f"<p>{e(s.notes)}</p>")
        header, rows = _table(s)
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            cells = "".join(
                f'<td class="{css}">{e(text)}</td>' if css else f"<td>{e(text)}</td>" for text, css in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
        if s.plot:
            data = base64.b64encode(Path(s.plot).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{e(s.title)} recall" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    path_md: str | os.PathLike,
    path_html: str | os.PathLike,
    sections: Sequence[ReportSection | Mapping[str, Any]],
    *,
    title: str = "llm2clip evaluation",
    meta: Mapping[str, Any] | None = None,
    paper_table: PaperTable | None = None,
) -> None:
    """Write the evaluation report as Markdown and as a standalone HTML page.

    Args:
        path_md: Markdown file; plots are linked relative to it.
        path_html: HTML file; plots are embedded as base64 PNG, so it can be mailed or uploaded
            alone (e.g. as an MLflow artifact).
        sections: one per eval set and caption type (:class:`ReportSection` or a dict of its
            fields).
        title: page title.
        meta: key/value lines shown first (model, git revision, data fingerprint, ...).
        paper_table: the paper-layout table, shown after ``meta`` (and before the sections).
    """
    secs = [ReportSection.coerce(s) for s in sections]
    meta = dict(meta or {})
    atomic_write_text(path_md, _markdown(title, meta, secs, Path(path_md).parent, paper_table))
    atomic_write_text(path_html, _html(title, meta, secs, paper_table))
    log.info("wrote report (%d sections) to %s and %s", len(secs), path_md, path_html)
