"""What prepare_data reports: counts, a contact-sheet preview, the manifest, the log summary."""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llm2clip.config import CommonConfig, PrepareDataConfig, config_hash, to_dict
from llm2clip.data.collect import Collection
from llm2clip.data.quality import QualityReport
from llm2clip.data.records import NOT_DEFECTS, Rejection, SampleRecord
from llm2clip.data.shards import EVAL_SPLIT, FORMAT_VERSION, SPLITS, STAGE, TRAIN_SPLITS, run_splits
from llm2clip.io import atomic_write_bytes

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.jpg"
PREVIEW_SAMPLES = 16
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


# How the stage runs (how many processes) does not change what it writes: left out of the
# config_hash of its manifest, which is then the same for any prepare_data.workers.
RUN_ONLY = ("workers",)


def output_hash(common: CommonConfig, cfg: PrepareDataConfig) -> str:
    """The ``config_hash`` of the output: of ``common`` and ``cfg`` without :data:`RUN_ONLY` fields."""
    return config_hash(common, {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY})


def counts(
    col: Collection, kept: Counter, rejects: list[Rejection], sources: list[str],
    duplicate_images: int, splits: tuple[str, ...] = TRAIN_SPLITS,
) -> dict[str, Any]:
    """All the numbers of one run (they go into the manifest and MLflow).

    ``kept``: ``(source, split) -> kept samples``. ``splits``: those of the run (train/val, or
    ``test`` for an evaluation set), counted overall and per source.
    """
    per_reason = Counter(r.reason for r in rejects)
    split_counts = Counter()
    for (_, split), n in kept.items():
        split_counts[split] += n
    seen = sum(col.seen.values())
    defects = sum(n for reason, n in per_reason.items() if reason not in NOT_DEFECTS)
    per_source = {}
    for name in sources:
        per_source[name] = {
            "seen": col.seen[name], **{split: kept[(name, split)] for split in splits},
            "quarantined": sum(1 for r in rejects if r.source == name),
        }
    return {
        "seen": seen, "valid": seen - defects, "valid_fraction": (seen - defects) / seen if seen else 0.0,
        **{split: split_counts[split] for split in splits}, "quarantined": len(rejects),
        "duplicates": sum(n for reason, n in per_reason.items() if reason in NOT_DEFECTS),
        "shared_images": duplicate_images,
        "captions_truncated": col.stats["captions_truncated"],
        "captions_dropped": col.stats["captions_dropped"],
        "per_source": per_source, "per_reason": dict(sorted(per_reason.items())),
        "skipped": dict(col.skipped),
    }


def metrics(c: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics for MLflow."""
    splits = [s for s in SPLITS if s in c]
    out = {k: float(c[k]) for k in ("seen", "valid", "valid_fraction", *splits, "quarantined",
                                    "duplicates", "shared_images", "captions_truncated", "captions_dropped")}
    for name, per in c["per_source"].items():
        out.update({f"source.{name}.{k}": float(v) for k, v in per.items()})
    out.update({f"quarantined.{reason}": float(n) for reason, n in c["per_reason"].items()})
    return out


def preview_rows(sources: Sequence[int], n: int = PREVIEW_SAMPLES) -> list[int]:
    """Which of the kept samples (given by their sources, in order) the preview shows: up to ``n``,
    spread over the sources in order of their first sample, each source's first ones."""
    column = np.asarray(sources)
    firsts = sorted(np.unique(column, return_index=True)[1].tolist())
    per = math.ceil(n / max(1, len(firsts)))
    return [r for first in firsts for r in np.flatnonzero(column == column[first])[:per].tolist()][:n]


def write_preview(path: Path, chosen: list[tuple[SampleRecord, bytes]], caption_fields: tuple[str, ...]) -> None:
    """A contact sheet of the :func:`preview_rows` samples (``(record, jpg bytes)``) with their
    first captions (their labels when there are no caption fields)."""
    if not chosen:
        return
    tile, text_h, cols = 128, 56, 4
    rows = math.ceil(len(chosen) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.truetype(_FONT, 9)
    except OSError:
        font = ImageFont.load_default()
    for i, (r, jpg) in enumerate(chosen):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        im.thumbnail((tile, tile))
        sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        text = f"[{r.split}] {r.captions[caption_fields[0]][0] if caption_fields else r.label}"
        lines = textwrap.wrap(text, width=26)[:5]
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    atomic_write_bytes(path, buf.getvalue())


def manifest(
    cfg: PrepareDataConfig, common: CommonConfig, c: dict[str, Any], shards: dict[str, list],
    labels: dict[str, set[str]], report: QualityReport,
) -> dict[str, Any]:
    """The ``manifest.json`` content (deterministic: no timestamps, nothing of how many workers ran).

    ``labels``: each source's labels among the kept samples. An evaluation set (``cfg.eval_set``)
    records its name as ``eval_set`` and has only ``test`` shards; training data has no
    ``eval_set`` field.
    """
    splits = run_splits(cfg.eval_set)
    split = ({"eval_set": cfg.eval_set, "rule": f"an evaluation set: every kept sample is in {EVAL_SPLIT}"}
             if cfg.eval_set else
             {"val_fraction": cfg.val_fraction,
              "rule": "val if sha256(key)[:8] / 2**64 < val_fraction; copies of one image follow their smallest key"})
    body = {
        "stage": STAGE,
        "format_version": FORMAT_VERSION,
        "config_hash": output_hash(common, cfg),
        "caption_fields": list(common.caption_fields),
        "counts": c,
        "shards": {s: shards.get(s, []) for s in splits},
        "image": {"format": "jpg", "mode": "RGB", "max_side": cfg.image_max_side,
                  "jpeg_quality": cfg.jpeg_quality},
        "split": split,
        "sources": [{"name": s.name, "kind": s.kind, "skipped": c["skipped"].get(s.name)}
                    for s in cfg.sources],
        "labels": {name: sorted(v) for name, v in sorted(labels.items())},
        "validation": {"success": report.success, "evaluated": report.evaluated,
                       "critical_failures": list(report.critical_failures),
                       "warnings": list(report.warnings), "result": report.result,
                       "data_docs": report.data_docs, "preview": f"validation/{PREVIEW_FILE}"},
        "quarantine": "quarantine.jsonl",
    }
    return {**body, "eval_set": cfg.eval_set} if cfg.eval_set else body


def log_summary(m: dict[str, Any], where: str) -> None:
    """One readable summary of what was made and where."""
    c = m["counts"]
    splits = [s for s in SPLITS if s in m["shards"]]
    reasons = ", ".join(f"{k} {v}" for k, v in c["per_reason"].items())
    log.info(
        "prepare_data%s: %s samples in %s shards at %s; %d of %d seen quarantined%s",
        f" (evaluation set {m['eval_set']})" if m.get("eval_set") else "",
        " + ".join(f"{c[s]} {s}" for s in splits), " + ".join(str(len(m["shards"][s])) for s in splits),
        where, c["quarantined"], c["seen"], f" ({reasons}; see {where}/quarantine.jsonl)" if reasons else "",
    )
    log.info("prepare_data: validation report %s/%s, preview %s/%s", where, m["validation"]["data_docs"],
             where, m["validation"]["preview"])
    for name, reason in c["skipped"].items():
        log.warning("prepare_data: source %r produced nothing: %s", name, reason)
