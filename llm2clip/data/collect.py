"""The two passes of prepare_data: validate every source sample, then split and write shards.

Pass 1 (:func:`collect`) validates each sample once, keeps its re-encoded jpg in a spill file
(so memory holds only the small per-sample records) and quarantines the rest. Between the
passes :func:`dedupe` drops exact duplicates and :func:`assign_splits` puts every copy of one
image in the same split (an evaluation set has one split, ``test``). Pass 2 (:func:`write_shards`)
writes the shards in a seeded order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llm2clip.config import CommonConfig, PrepareDataConfig
from llm2clip.data import records as R
from llm2clip.data.records import Rejection, SampleRecord, SampleRejected
from llm2clip.data.shards import EVAL_SPLIT, ShardWriter, encode_meta, run_splits, shard_entry, shard_name
from llm2clip.data.sources import SourceReader
from llm2clip.data.validate import validate_sample
from llm2clip.io import atomic_write_text

log = logging.getLogger(__name__)


class SpillFile:
    """An anonymous temp file the encoded jpgs wait in between the two passes."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="llm2clip-spill-")
        self._end = 0

    def put(self, data: bytes) -> tuple[int, int]:
        """Append ``data``; returns ``(offset, length)``."""
        self._file.seek(self._end)
        self._file.write(data)
        offset, self._end = self._end, self._end + len(data)
        return offset, len(data)

    def get(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(length)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Collection:
    """What pass 1 found: kept records, rejections and counts."""

    records: list[SampleRecord] = field(default_factory=list)
    rejects: list[Rejection] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)  # per source
    stats: Counter = field(default_factory=Counter)  # captions_truncated, captions_dropped
    skipped: dict[str, str] = field(default_factory=dict)  # source -> why it produced nothing


def collect(
    readers: Iterable[SourceReader], cfg: PrepareDataConfig, common: CommonConfig, spill: SpillFile
) -> Collection:
    """Pass 1: read and validate every sample of every source (one progress bar per source)."""
    out = Collection()
    owner: dict[str, str] = {}  # key -> source_id of the kept sample that has it
    for reader in readers:
        if reader.skipped:
            out.skipped[reader.name] = reader.skipped
        bar = tqdm(reader.samples, total=reader.total, desc=f"validate {reader.name}", unit="img",
                   mininterval=1.0)
        for raw in bar:
            out.seen[reader.name] += 1
            try:
                if raw.error is not None:  # the source's own reason (and line) beats "key used"
                    raise SampleRejected(*raw.error)
                if raw.key in owner:
                    used = f"key {raw.key} is already used by {owner[raw.key]}"
                    raise SampleRejected(R.DUPLICATE_KEY, used)
                record, jpg = validate_sample(
                    raw, common.caption_fields, cfg.validation, max_side=cfg.image_max_side,
                    jpeg_quality=cfg.jpeg_quality, stats=out.stats,
                )
            except SampleRejected as rej:
                out.rejects.append(
                    Rejection(raw.key, raw.source, raw.source_id, rej.reason, rej.detail, line=raw.line)
                )
                continue
            owner[raw.key] = raw.source_id
            record.offset, record.length = spill.put(jpg)
            out.records.append(record)
        bar.close()
    return out


def dedupe(records: list[SampleRecord]) -> tuple[list[SampleRecord], list[Rejection]]:
    """Drop exact duplicates (same pixels AND same captions); the smallest key is kept."""
    groups: dict[tuple[str, str], list[SampleRecord]] = defaultdict(list)
    for r in records:
        groups[(r.pixel_hash, r.caption_hash)].append(r)
    dropped: dict[str, Rejection] = {}
    for group in groups.values():
        group.sort(key=lambda r: r.key)
        for r in group[1:]:
            detail = f"same image and captions as {group[0].key} ({group[0].source_id})"
            dropped[r.key] = Rejection(r.key, r.source, r.source_id, R.DUPLICATE, detail)
    return [r for r in records if r.key not in dropped], list(dropped.values())


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of keys (by sha256), else ``train``."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def assign_splits(records: list[SampleRecord], val_fraction: float, eval_set: str = "") -> int:
    """Set ``split`` on every record; all copies of an image follow its smallest key.

    With ``eval_set`` (the run prepares an evaluation set) every record goes to ``test``.

    Returns:
        The number of images that occur in more than one kept sample.
    """
    anchor: dict[str, str] = {}
    members: Counter = Counter()
    for r in records:
        anchor[r.pixel_hash] = min(anchor.get(r.pixel_hash, r.key), r.key)
        members[r.pixel_hash] += 1
    for r in records:
        r.split = EVAL_SPLIT if eval_set else split_of(anchor[r.pixel_hash], val_fraction)
    return sum(1 for n in members.values() if n > 1)


def shard_order(records: list[SampleRecord], split: str, seed: int) -> list[SampleRecord]:
    """The records of ``split`` in a seeded, source-mixing but reproducible order."""
    chosen = [r for r in records if r.split == split]
    return sorted(chosen, key=lambda r: hashlib.sha256(f"{seed}:{r.key}".encode()).digest())


def write_shards(
    out: Path, records: list[SampleRecord], spill: SpillFile, cfg: PrepareDataConfig, common: CommonConfig
) -> dict[str, list[dict[str, Any]]]:
    """Pass 2: write ``{split}-NNNNNN.tar`` shards; returns ``{split: [{name, count, sha256}]}``.

    The splits are those of the run (:func:`~llm2clip.data.shards.run_splits`): train and val, or
    the one ``test`` split of an evaluation set.
    """
    shards: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(records), desc="write shards", unit="img", mininterval=1.0)
    for split in run_splits(cfg.eval_set):
        items = shard_order(records, split, common.seed)
        shards[split] = []
        for index, start in enumerate(range(0, len(items), cfg.shard_size)):
            path = out / shard_name(split, index)
            with ShardWriter(path) as writer:
                for r in items[start : start + cfg.shard_size]:
                    meta = encode_meta(r.meta(common.caption_fields))
                    writer.write(r.key, {"jpg": spill.get(r.offset, r.length), "json": meta})
                    bar.update()
            shards[split].append(shard_entry(path, writer.count))
    bar.close()
    return shards


# Line breaks for str.splitlines() that json.dumps(ensure_ascii=False) leaves raw: escaped, so a
# rejected path or caption holding one never splits its quarantine record in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_quarantine(path: Path, rejects: list[Rejection]) -> None:
    """``quarantine.jsonl``: one rejected sample per line (an empty file when none)."""
    lines = (json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True).translate(_LINE_BREAKS) + "\n"
             for r in rejects)
    atomic_write_text(path, "".join(lines))
