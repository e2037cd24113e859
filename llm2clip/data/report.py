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
from llm2clip.data.shards import FORMAT_VERSION, SPLITS, STAGE
from llm2clip.io import atomic_write_bytes

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.jpg"
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def counts(
    col: Collection, kept: list[SampleRecord], rejects: list[Rejection], sources: list[str],
    duplicate_images: int,
) -> dict[str, Any]:
    """All the numbers of one run (they go into the manifest and MLflow)."""
    per_reason = Counter(r.reason for r in rejects)
    split_counts = Counter(r.split for r in kept)
    seen = sum(col.seen.values())
    defects = sum(n for reason, n in per_reason.items() if reason not in NOT_DEFECTS)
    per_source = {}
    for name in sources:
        mine = Counter(r.split for r in kept if r.source == name)
        per_source[name] = {
            "seen": col.seen[name], "train": mine["train"], "val": mine["val"],
            "quarantined": sum(1 for r in rejects if r.source == name),
        }
    return {
        "seen": seen, "valid": seen - defects, "valid_fraction": (seen - defects) / seen if seen else 0.0,
        "train": split_counts["train"], "val": split_counts["val"], "quarantined": len(rejects),
        "duplicates": sum(n for reason, n in per_reason.items() if reason in NOT_DEFECTS),
        "shared_images": duplicate_images,
        "captions_truncated": col.stats["captions_truncated"],
        "captions_dropped": col.stats["captions_dropped"],
        "per_source": per_source, "per_reason": dict(sorted(per_reason.items())),
        "skipped": dict(col.skipped),
    }


def metrics(c: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics for MLflow."""
    out = {k: float(c[k]) for k in ("seen", "valid", "valid_fraction", "train", "val", "quarantined",
                                    "duplicates", "shared_images", "captions_truncated", "captions_dropped")}
    for name, per in c["per_source"].items():
        out.update({f"source.{name}.{k}": float(v) for k, v in per.items()})
    out.update({f"quarantined.{reason}": float(n) for reason, n in c["per_reason"].items()})
    return out


def write_preview(
    path: Path, records: list[SampleRecord], spill: SpillFile, caption_fields: tuple[str, ...], n: int = 16
) -> None:
    """A contact sheet of up to ``n`` samples (spread over the sources) with their captions."""
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
        text = f"[{r.split}] {r.captions[caption_fields[0]][0]}"
        lines = textwrap.wrap(text, width=26)[:5]
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    atomic_write_bytes(path, buf.getvalue())


def manifest(
    cfg: PrepareDataConfig, common: CommonConfig, c: dict[str, Any], shards: dict[str, list],
    kept: list[SampleRecord], report: QualityReport,
) -> dict[str, Any]:
    """The ``manifest.json`` content (deterministic: no timestamps)."""
    labels: dict[str, set[str]] = {}
    for r in kept:
        if r.label is not None:
            labels.setdefault(r.source, set()).add(r.label)
    return {
        "stage": STAGE,
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash(common, cfg),
        "caption_fields": list(common.caption_fields),
        "counts": c,
        "shards": {split: shards.get(split, []) for split in SPLITS},
        "image": {"format": "jpg", "mode": "RGB", "max_side": cfg.image_max_side,
                  "jpeg_quality": cfg.jpeg_quality},
        "split": {"val_fraction": cfg.val_fraction,
                  "rule": "val if sha256(key)[:8] / 2**64 < val_fraction; copies of one image "
                          "follow their smallest key"},
        "sources": [{"name": s.name, "kind": s.kind, "skipped": c["skipped"].get(s.name)}
                    for s in cfg.sources],
        "labels": {name: sorted(v) for name, v in sorted(labels.items())},
        "validation": {"success": report.success, "evaluated": report.evaluated,
                       "critical_failures": list(report.critical_failures),
                       "warnings": list(report.warnings), "result": report.result,
                       "data_docs": report.data_docs, "preview": f"validation/{PREVIEW_FILE}"},
        "quarantine": "quarantine.jsonl",
    }


def log_summary(m: dict[str, Any], where: str) -> None:
    """One readable summary of what was made and where."""
    c = m["counts"]
    n_shards = {s: len(m["shards"][s]) for s in SPLITS}
    reasons = ", ".join(f"{k} {v}" for k, v in c["per_reason"].items())
    log.info(
        "prepare_data: %d train + %d val samples in %d + %d shards at %s; %d of %d seen quarantined%s",
        c["train"], c["val"], n_shards["train"], n_shards["val"], where, c["quarantined"], c["seen"],
        f" ({reasons}; see {where}/quarantine.jsonl)" if reasons else "",
    )
    log.info("prepare_data: validation report %s/%s, preview %s/%s", where, m["validation"]["data_docs"],
             where, m["validation"]["preview"])
    for name, reason in c["skipped"].items():
        log.warning("prepare_data: source %r produced nothing: %s", name, reason)
