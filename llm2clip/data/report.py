"""What prepare_data reports: counts, a contact-sheet preview, the manifest, the log summary."""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from llm2clip.config import CommonConfig, PrepareDataConfig, config_hash
from llm2clip.data.collect import Collection, SpillFile
from llm2clip.data.quality import QualityReport
from llm2clip.data.records import NOT_DEFECTS, Rejection, SampleRecord
from llm2clip.data.shards import EVAL_SPLIT, FORMAT_VERSION, SPLITS, STAGE, TRAIN_SPLITS, run_splits
from llm2clip.io import atomic_write_bytes

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.jpg"
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def counts(
    col: Collection, kept: list[SampleRecord], rejects: list[Rejection], sources: list[str],
    duplicate_images: int, splits: tuple[str, ...] = TRAIN_SPLITS,
) -> dict[str, Any]:
    """All the numbers of one run (they go into the manifest and MLflow).

    ``splits``: those of the run (train/val, or ``test`` for an evaluation set), counted overall
    and per source.
    """
    per_reason = Counter(r.reason for r in rejects)
    split_counts = Counter(r.split for r in kept)
    seen = sum(col.seen.values())
    defects = sum(n for reason, n in per_reason.items() if reason not in NOT_DEFECTS)
    per_source = {}
    for name in sources:
        mine = Counter(r.split for r in kept if r.source == name)
        per_source[name] = {
            "seen": col.seen[name], **{split: mine[split] for split in splits},
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


def write_preview(
    path: Path, records: list[SampleRecord], spill: SpillFile, caption_fields: tuple[str, ...], n: int = 16
) -> None:
    """A contact sheet of up to ``n`` samples (spread over the sources) with their first captions
    (their labels when there are no caption fields)."""
    by_source: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r)
    per = math.ceil(n / max(1, len(by_source)))
    chosen = [r for group in by_source.values() for r in group[:per]][:n]
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
    for i, r in enumerate(chosen):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        im = Image.open(io.BytesIO(spill.get(r.offset, r.length))).convert("RGB")
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
    kept: list[SampleRecord], report: QualityReport,
) -> dict[str, Any]:
    """The ``manifest.json`` content (deterministic: no timestamps).

    An evaluation set (``cfg.eval_set``) records its name as ``eval_set`` and has only ``test``
    shards; training data has no ``eval_set`` field.
    """
    labels: dict[str, set[str]] = {}
    for r in kept:
        if r.label is not None:
            labels.setdefault(r.source, set()).add(r.label)
    splits = run_splits(cfg.eval_set)
    split = ({"eval_set": cfg.eval_set, "rule": f"an evaluation set: every kept sample is in {EVAL_SPLIT}"}
             if cfg.eval_set else
             {"val_fraction": cfg.val_fraction,
              "rule": "val if sha256(key)[:8] / 2**64 < val_fraction; copies of one image follow their smallest key"})
    body = {
        "stage": STAGE,
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash(common, cfg),
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
