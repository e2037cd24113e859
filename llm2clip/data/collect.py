"""The parent's side of prepare_data: merge the groups' outcomes, dedupe, split, order the shards.

Pass 1 runs in workers, one group at a time (:mod:`llm2clip.data.groups`). The parent merges the
groups' outcomes in group order (:func:`collect`), exactly as one process reading the sources
in order would: it quarantines the rejected samples and a key already taken by an earlier kept
sample (``duplicate_key``), and keeps one small row per kept sample in a :class:`KeptTable`.
Between the passes :func:`dedupe` drops exact duplicates and :func:`assign_splits` puts every
copy of one image in the same split (an evaluation set has one split, ``test``); both look at the
table alone. Pass 2 (:func:`write_shards`) hands each output shard, with its samples in a seeded
order (:func:`shard_order`), to a worker.

Captions, labels, sizes and the re-encoded images are not held here: they stay in the group
files, from where :class:`Details` reads them back for the few places that need them (the
great-expectations table, the preview, the quarantine detail of a duplicate).
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llm2clip.config import CommonConfig, PrepareDataConfig
from llm2clip.data import records as R
from llm2clip.data.groups import GroupFiles, GroupResult, Plan, ShardJob, Store, group_name, write_shard
from llm2clip.data.pool import ordered_map, replay_logs
from llm2clip.data.records import Rejection, SampleRecord
from llm2clip.data.shards import EVAL_SPLIT, run_splits, shard_name
from llm2clip.io import atomic_write_text

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", EVAL_SPLIT)  # split code (a byte of KeptTable.split) -> name


class KeptTable:
    """The kept samples as the parent holds them between the passes: one row each, in stream order.

    Memory per row: the key (a Python ``str``: 49 bytes + its length, plus an 8-byte list slot),
    the pixel and caption hashes (16 + 16), the source (2), the group and the place in it (4 + 4),
    the byte ranges of the ``jpg`` and ``json`` in the group tar (4 x 8) and the split (1): about
    135 bytes + the key's length (147 for ``web-000012345``, measured by
    ``bench/bench_prepare_data.py``; 1.8 GB for CC12M). During pass 1 a dict from key to row adds
    about 70 more; it is freed when pass 1 ends.
    """

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources  # source index -> name
        self.keys: list[str] = []
        self.source = array("H")
        self.group = array("I")
        self.index = array("I")  # place of the sample in its group's marker
        self.hashes = bytearray()  # 32 bytes a row: pixel hash, then caption hash
        self.where = array("Q")  # 4 a row: jpg offset, jpg length, json offset, json length
        self.split = bytearray()  # a SPLIT_NAMES index a row

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, key: str, source: int, group: int, index: int, sample: dict[str, Any]) -> int:
        """Add a kept sample (its marker entry); returns its row."""
        self.keys.append(key)
        self.source.append(source)
        self.group.append(group)
        self.index.append(index)
        record = sample["record"]
        self.hashes += bytes.fromhex(record["pixel_hash"]) + bytes.fromhex(record["caption_hash"])
        self.where.extend([*sample["jpg"], *sample["json"]])
        self.split.append(0)
        return len(self.keys) - 1

    def select(self, rows: np.ndarray) -> KeptTable:
        """A new table of ``rows`` (ascending), in that order."""
        out = KeptTable(self.sources)
        out.keys = [self.keys[r] for r in rows]
        for name in ("source", "group", "index"):
            column = getattr(self, name)
            getattr(out, name).frombytes(np.frombuffer(column, column.typecode)[rows].tobytes())
        out.hashes = bytearray(np.frombuffer(self.hashes, "V32")[rows].tobytes())
        out.where.frombytes(np.frombuffer(self.where, "Q").reshape(-1, 4)[rows].tobytes())
        out.split = bytearray(np.frombuffer(self.split, np.uint8)[rows].tobytes())
        return out

    def source_name(self, row: int) -> str:
        return self.sources[self.source[row]]

    def split_name(self, row: int) -> str:
        return SPLIT_NAMES[self.split[row]]

    def split_counts(self) -> Counter:
        """``(source name, split) -> kept samples``."""
        pairs = Counter(zip(self.source, self.split, strict=True))
        return Counter({(self.sources[s], SPLIT_NAMES[p]): n for (s, p), n in pairs.items()})

    def shard_item(self, row: int) -> tuple[str, str, int, int, int, int]:
        """What pass 2 needs of a row: key, group file, jpg offset/length, json offset/length."""
        return (self.keys[row], group_name(self.group[row]), *self.where[4 * row : 4 * row + 4])


class Details:
    """Reads kept samples back from their group files: the full record, the jpg (a few markers cached)."""

    def __init__(self, store: GroupFiles, cached: int = 2) -> None:
        self.store = store
        self._markers: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cached = cached

    def _marker(self, group: int) -> dict[str, Any]:
        if group in self._markers:
            self._markers.move_to_end(group)
        else:
            self._markers[group] = self.store.read_json(f"{group_name(group)}.json")
            while len(self._markers) > self._cached:
                self._markers.popitem(last=False)
        return self._markers[group]

    def sample(self, table: KeptTable, row: int) -> dict[str, Any]:
        """The marker entry of a row (key, source_id, record, byte ranges)."""
        return self._marker(table.group[row])["samples"][table.index[row]]

    def source_ids(self, table: KeptTable, rows: Iterable[int]) -> dict[int, str]:
        """The source ids of ``rows``, each group file read once."""
        return {row: self.sample(table, row)["source_id"] for row in sorted(set(rows), key=lambda r: table.group[r])}

    def record(self, table: KeptTable, row: int) -> SampleRecord:
        s = self.sample(table, row)
        return SampleRecord(key=s["key"], source=table.source_name(row), source_id=s["source_id"],
                            split=table.split_name(row), **s["record"])

    def jpg(self, table: KeptTable, row: int) -> bytes:
        offset, length = table.where[4 * row : 4 * row + 2]
        return self.store.read_ranges(f"{group_name(table.group[row])}.tar", [(offset, offset + length)])[0]


@dataclass
class Collection:
    """What pass 1 found: the kept samples, the rejections and the counts."""

    table: KeptTable
    rejects: list[Rejection] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)  # per source
    stats: Counter = field(default_factory=Counter)  # captions_truncated, captions_dropped
    skipped: dict[str, str] = field(default_factory=dict)  # source -> why it produced nothing
    reused: int = 0  # groups taken over from an earlier run
    key_owners: list[tuple[int, int]] = field(default_factory=list)  # duplicate_key rejection -> row with the key


def collect(plan: Plan, results: Iterable[GroupResult], cfg: PrepareDataConfig, details: Details) -> Collection:
    """Merge the groups' outcomes (``results``, one per group of ``plan``, in group order)."""
    found = Collection(KeptTable([s.name for s in cfg.sources]), skipped=dict(plan.skipped))
    owner: dict[str, int] = {}  # key -> row of the kept sample that has it
    bar = tqdm(total=plan.total, desc="validate", unit="img", mininterval=1.0)
    for group, result in zip(plan.groups, results, strict=True):
        replay_logs(result.logs)
        found.reused += result.reused
        for index, sample in enumerate(result.samples):
            _merge(found, owner, group.source, group.number, index, sample)
        bar.update(len(result.samples))
    bar.close()
    _name_key_owners(found, details)
    if found.reused:
        log.info("prepare_data: %d of %d groups reused from an earlier run", found.reused, len(plan.groups))
    return found


def _merge(found: Collection, owner: dict[str, int], source: int, group: int, index: int, s: dict[str, Any]) -> None:
    """One sample's outcome, in stream order: kept, or quarantined with its reason."""
    name, key = found.table.sources[source], s["key"]
    found.seen[name] += 1
    reason: list[str] | None = s.get("error")
    if not s.get("source_error") and key in owner:  # the source's own reason beats "key used"
        found.key_owners.append((len(found.rejects), owner[key]))
        reason = [R.DUPLICATE_KEY, f"key {key} is already used by"]  # + its source id, after pass 1
    elif not s.get("source_error"):
        found.stats.update(s.get("stats", {}))  # counted only for samples that were validated
    if reason is not None:
        found.rejects.append(Rejection(key, name, s["source_id"], *reason, line=s["line"]))
        return
    owner[key] = found.table.append(key, source, group, index, s)


def _name_key_owners(found: Collection, details: Details) -> None:
    """Complete each ``duplicate_key`` rejection with the source id of the kept sample that has the key."""
    used = details.source_ids(found.table, (row for _, row in found.key_owners))
    for i, row in found.key_owners:
        found.rejects[i] = replace(found.rejects[i], detail=f"{found.rejects[i].detail} {used[row]}")


def dedupe(table: KeptTable) -> tuple[KeptTable, list[tuple[int, int]]]:
    """Drop exact duplicates (same pixels AND same captions); the smallest key of each set is kept.

    Returns:
        The kept rows as a new table, and ``(dropped row, kept row)`` pairs (rows of ``table``):
        sets in order of their first sample, each set's drops by key.
    """
    _, inverse, counts = np.unique(np.frombuffer(table.hashes, "V32"), return_inverse=True, return_counts=True)
    sets: dict[int, list[int]] = {}
    for row in np.flatnonzero(counts[inverse] > 1).tolist():
        sets.setdefault(int(inverse[row]), []).append(row)
    pairs = []
    for rows in sets.values():
        rows.sort(key=lambda r: table.keys[r])
        pairs += [(r, rows[0]) for r in rows[1:]]
    if not pairs:
        return table, []
    keep = np.ones(len(table), bool)
    keep[[r for r, _ in pairs]] = False
    return table.select(np.flatnonzero(keep)), pairs


def duplicate_rejections(pairs: list[tuple[int, int]], table: KeptTable, details: Details) -> list[Rejection]:
    """The quarantine records of :func:`dedupe`'s drops (their source ids read from the group files)."""
    ids = details.source_ids(table, (row for pair in pairs for row in pair))
    out = []
    for dropped, kept in pairs:
        detail = f"same image and captions as {table.keys[kept]} ({ids[kept]})"
        out.append(Rejection(table.keys[dropped], table.source_name(dropped), ids[dropped], R.DUPLICATE, detail))
    return out


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of keys (by sha256), else ``train``."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def assign_splits(table: KeptTable, val_fraction: float, eval_set: str = "") -> int:
    """Set the split of every row; all copies of an image follow its smallest key.

    With ``eval_set`` (the run prepares an evaluation set) every row goes to ``test``.

    Returns:
        The number of images that occur in more than one kept sample.
    """
    pixels = np.frombuffer(table.hashes, [("pixel", "V16"), ("caption", "V16")])["pixel"]
    _, inverse, counts = np.unique(pixels, return_inverse=True, return_counts=True)
    if eval_set:
        table.split[:] = bytes([SPLIT_NAMES.index(EVAL_SPLIT)]) * len(table)
        return int((counts > 1).sum())
    anchor: dict[int, str] = {}  # image -> smallest key, for images kept more than once
    for row in np.flatnonzero(counts[inverse] > 1).tolist():
        image = int(inverse[row])
        anchor[image] = min(anchor.get(image, table.keys[row]), table.keys[row])
    for row, image in enumerate(inverse.tolist()):
        table.split[row] = SPLIT_NAMES.index(split_of(anchor.get(image, table.keys[row]), val_fraction))
    return int((counts > 1).sum())


def shard_order(table: KeptTable, split: str, seed: int) -> np.ndarray:
    """The rows of ``split`` in a seeded, source-mixing but reproducible order (by sha256 of seed and key)."""
    rows = np.flatnonzero(np.frombuffer(table.split, np.uint8) == SPLIT_NAMES.index(split))
    digests = b"".join(hashlib.sha256(f"{seed}:{table.keys[r]}".encode()).digest() for r in rows.tolist())
    return rows[np.argsort(np.frombuffer(digests, "V32"), kind="stable")]


def kept_records(table: KeptTable, details: Details, labels: dict[str, set[str]]) -> Iterator[SampleRecord]:
    """Every kept sample's full record, in order, read back group by group; gathers each
    source's labels into ``labels`` on the way."""
    for row in range(len(table)):
        record = details.record(table, row)
        if record.label is not None:
            labels.setdefault(record.source, set()).add(record.label)
        yield record


def _shard_jobs(table: KeptTable, split: str, cfg: PrepareDataConfig, common: CommonConfig, groups: GroupFiles,
                output: Store) -> Iterator[ShardJob]:
    order = shard_order(table, split, common.seed)
    for index, start in enumerate(range(0, len(order), cfg.shard_size)):
        items = [table.shard_item(row) for row in order[start : start + cfg.shard_size].tolist()]
        yield ShardJob(shard_name(split, index), items, groups, output)


def write_shards(
    executor: Executor, window: int, table: KeptTable, cfg: PrepareDataConfig, common: CommonConfig,
    groups: GroupFiles, output: Store,
) -> dict[str, list[dict[str, Any]]]:
    """Pass 2: ``{split}-NNNNNN.tar`` shards, written by the workers; returns
    ``{split: [{name, count, sha256}]}``.

    The splits are those of the run (:func:`~llm2clip.data.shards.run_splits`): train and val, or
    the one ``test`` split of an evaluation set.
    """
    shards: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(table), desc="write shards", unit="img", mininterval=1.0)
    for split in run_splits(cfg.eval_set):
        shards[split] = []
        for entry in ordered_map(executor, write_shard, _shard_jobs(table, split, cfg, common, groups, output),
                                 window):
            shards[split].append(entry)
            bar.update(entry["count"])
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
