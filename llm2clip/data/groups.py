"""Groups: the units prepare_data's workers validate (pass 1), and the shard writer (pass 2).

A *group* is a contiguous part of one source's sample stream that a worker can read on its own:

- ``webdataset``: one input shard (one URL) per group;
- ``manifest``: :data:`SAMPLES_PER_GROUP` samples (merged rows) per group; each worker process
  parses the manifest once and reads only the images of its range;
- every other kind (the seeded ``synthetic`` / ``emoji`` generators, the benchmark readers, ``dvc``):
  the whole source is one group. A seeded generator makes sample ``i`` from the random state
  that samples ``0..i-1`` left, so skipping to an index would cost making every sample before
  it; such sources run in parallel with each other, not within themselves.

Groups are numbered in stream order (source order, then shard or range order). That numbering,
not the worker count, decides everything the output depends on: the parent merges the groups'
results in that order (:mod:`llm2clip.data.collect`).

Pass 1 (:func:`run_group`, in a worker): read the group's samples, validate and re-encode each
(:func:`~llm2clip.data.validate.validate_sample`), write the kept ones' ``jpg`` + ``json``
members to ``<data>/.groups/group-NNNNNN.tar`` and then every sample's outcome to
``group-NNNNNN.json`` (the *marker*: its presence, fingerprint and the tar's sha256 say the group
is complete, so a rerun after a crash reuses it). Pass 2 (:func:`write_shard`, in a worker):
fetch the samples of one output shard by byte range from the group tars and write the shard.

The intermediate files live on the output store (a local folder or an ``s3://`` prefix,
:class:`Store`) and are removed when the output shards are written. With an ``s3://`` output a
worker's local disk holds one group tar or one output shard at a time (a temp folder); with a
local output everything is written in place. A worker's memory holds one group's outcomes (no
images) or :data:`FETCH_BATCH` samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, ManifestSource, PrepareDataConfig, Source, WebDatasetSource, to_dict
from llm2clip.data.pool import LogLine, captured_logs, muted, worker_count
from llm2clip.data.records import RawSample, SampleRejected
from llm2clip.data.shards import ShardWriter, encode_meta, shard_entry
from llm2clip.data.sources import entry_sample, expand_urls, iter_webdataset, open_source, parse_manifest
from llm2clip.data.validate import validate_sample
from llm2clip.io import StageError, atomic_write_text, is_remote, s3_filesystem

SAMPLES_PER_GROUP = 4096  # samples (merged rows) of a manifest per group
POOL_MIN_SAMPLES = 2000  # prepare_data.workers: 0 runs a plan of fewer samples in one process
GROUPS_DIR = ".groups"  # under the output: the intermediate group tars and markers
FORMAT = 1  # of the group files; a marker of another format is never reused


@dataclass(frozen=True)
class Group:
    """One unit of pass-1 work: the whole of ``sources[source]``, one ``url`` of it (webdataset)
    or its samples ``start``..``stop`` (manifest)."""

    number: int
    source: int
    url: str = ""
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        return group_name(self.number)


def group_name(number: int) -> str:
    """File stem of a group's tar and marker: ``group-000003``."""
    return f"group-{number:06d}"


@dataclass
class Plan:
    """What the parent knows before pass 1: the groups, the sources that give nothing, sizes."""

    groups: list[Group] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # source name -> why it produced nothing
    total: int | None = 0  # samples expected (None: a source that cannot say)
    sources: dict[int, Source] = field(default_factory=dict)  # what the workers read (see plan_groups)
    lineage: dict[str, dict[str, str]] = field(default_factory=dict)  # source name -> what was read


def plan_groups(cfg: PrepareDataConfig, common: CommonConfig) -> Plan:
    """Open every source (its errors and warnings happen here, in the parent) and cut it in groups.

    Raises:
        StageError: as :func:`~llm2clip.data.sources.open_source` and the readers' index checks.
    """
    plan = Plan()
    for i, src in enumerate(cfg.sources):
        reader = open_source(src, common)  # lazy: no sample is read here
        if reader.skipped:
            plan.skipped[src.name] = reader.skipped
            continue
        # a source that resolved something when opened (a dvc source: its branch to a commit)
        # offers the source that reads exactly that: every worker reads the same data
        plan.sources[i] = getattr(reader, "pinned", None) or src
        if getattr(reader, "lineage", None):
            plan.lineage[src.name] = reader.lineage
        total = reader.total
        if isinstance(src, WebDatasetSource):
            parts = [{"url": url} for url in expand_urls(src.urls)]
        elif isinstance(src, ManifestSource):
            total = len(manifest_entries(src, common.s3_endpoint_url))
            step = SAMPLES_PER_GROUP
            parts = [{"start": a, "stop": min(a + step, total)} for a in range(0, total, step)]
        else:
            parts = [{}]
        plan.groups += [Group(len(plan.groups) + j, i, **part) for j, part in enumerate(parts)]
        plan.total = None if plan.total is None or total is None else plan.total + total
    return plan


def workers_for(plan: Plan, workers: int) -> int:
    """How many worker processes run the plan: ``prepare_data.workers`` when set; when 0, one per
    core, except that a plan of one group or of fewer than :data:`POOL_MIN_SAMPLES` samples
    (known in advance) runs in this process: starting a worker (a fresh interpreter importing
    PIL, numpy and the project, ~0.5 s of a core) would cost more than it saves. The output is
    the same either way."""
    if workers:
        return workers
    if len(plan.groups) <= 1 or (plan.total is not None and plan.total < POOL_MIN_SAMPLES):
        return 1
    return worker_count(0)


# ---------------------------------------------------------------------------- group samples

_PARSED: dict[str, list] = {}  # manifest -> its merged rows, parsed once per process


def manifest_entries(src: ManifestSource, endpoint_url: str) -> list:
    """The merged rows of a manifest (:func:`~llm2clip.data.sources.merge_rows`), parsed once per process."""
    key = json.dumps([to_dict(src), endpoint_url], sort_keys=True)
    if key not in _PARSED:
        _PARSED[key] = parse_manifest(src, endpoint_url)
    return _PARSED[key]


def forget_manifests() -> None:
    """Drop the parsed manifests of this process."""
    _PARSED.clear()


def manifest_samples(src: ManifestSource, endpoint_url: str, start: int, stop: int) -> Iterator[RawSample]:
    """Samples ``start``..``stop`` of a manifest, exactly as ``iter_manifest`` yields them; only
    their images are read (the manifest is parsed now, the images as the samples are iterated)."""
    entries = manifest_entries(src, endpoint_url)[start:stop]
    return (entry_sample(src, e, endpoint_url) for e in entries)


def _escape(url: str) -> str:
    """``url`` as a one-URL webdataset ``urls`` pattern (braces and commas taken literally)."""
    return re.sub(r"([\\{},])", r"\\\1", url)


def group_samples(group: Group, src: Source, common: CommonConfig) -> Iterator[RawSample]:
    """The raw samples of one group, in stream order."""
    if group.url:
        return iter_webdataset(replace(src, urls=_escape(group.url)), common.s3_endpoint_url)
    if group.stop is not None:
        return manifest_samples(src, common.s3_endpoint_url, group.start, group.stop)
    return open_source(src, common).samples


# ------------------------------------------------------------------------------------ store


@dataclass(frozen=True)
class Store:
    """A folder for prepare_data's files: a local path or an ``s3://`` prefix."""

    root: str
    endpoint_url: str = ""

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def local_file(self, name: str) -> Iterator[Path]:
        """A local path to write ``name`` at (write it atomically); on S3 uploaded when the block ends."""
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            yield Path(self.root) / name
            return
        scratch = Path(tempfile.mkdtemp(prefix="llm2clip-prepare-"))
        try:
            yield scratch / name
            s3_filesystem(self.endpoint_url).put_file(str(scratch / name), self.path(name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def read_json(self, name: str) -> Any:
        """The JSON in ``name``; None when it is missing or not JSON."""
        try:
            if self.remote:
                data = s3_filesystem(self.endpoint_url).cat_file(self.path(name))
            else:
                data = Path(self.path(name)).read_bytes()
            return json.loads(data)
        except (FileNotFoundError, ValueError):
            return None

    def sha256(self, name: str) -> str | None:
        """sha256 of ``name``, read in chunks; None when it is missing."""
        digest = hashlib.sha256()
        try:
            opened = s3_filesystem(self.endpoint_url).open(self.path(name), "rb") if self.remote \
                else open(self.path(name), "rb")
            with opened as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes ``[start, end)`` of ``name`` for every range (S3: fetched concurrently)."""
        if self.remote:
            fs = s3_filesystem(self.endpoint_url)
            return fs.cat_ranges([self.path(name)] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
        with open(self.path(name), "rb") as f:
            return [os.pread(f.fileno(), b - a, a) for a, b in ranges]

    def remove(self) -> None:
        """Delete the folder and everything in it (no error when it does not exist)."""
        if self.remote:
            fs = s3_filesystem(self.endpoint_url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(self.root.rstrip("/"), recursive=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def groups_store(data: str, endpoint_url: str = "") -> Store:
    """Where the intermediate group files of the output ``data`` live."""
    return Store(f"{str(data).rstrip('/')}/{GROUPS_DIR}", endpoint_url)


# -------------------------------------------------------------------- fan-out across pods


def in_part(group: Group, part: int, parts: int) -> bool:
    """Whether group task ``part`` of ``parts`` runs ``group``: round robin by group number, so
    a source's equal input shards spread evenly."""
    return group.number % parts == part


def plan_digest(plan: Plan, cfg: PrepareDataConfig, common: CommonConfig) -> str:
    """What every group's files depend on, over the whole plan (the groups' fingerprints, in order)."""
    prints = [fingerprint(GroupJob(g, plan.sources[g.source], cfg, common, Store(""))) for g in plan.groups]
    return hashlib.sha256(json.dumps([prints, sorted(plan.skipped.items())]).encode()).hexdigest()


@dataclass(frozen=True)
class PartStores:
    """The group files of a fanned-out pass 1, read where the group tasks wrote them: group ``n``
    is in ``parts[n % len(parts)]`` (:func:`in_part`). Read-only: a merge never makes a group."""

    parts: tuple[Store, ...]

    def _store(self, name: str) -> Store:
        return self.parts[int(name.split("-")[1].split(".")[0]) % len(self.parts)]

    def read_json(self, name: str) -> Any:
        return self._store(name).read_json(name)

    def sha256(self, name: str) -> str | None:
        return self._store(name).sha256(name)

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self._store(name).read_ranges(name, ranges)

    def local_file(self, name: str):
        raise RuntimeError(f"{name}: the merge of a fan-out reads group files, it never writes one")

    def remove(self) -> None:
        """Nothing: the parts are the group tasks' outputs (KFP's cache may hand them to a later run)."""


GroupFiles = Store | PartStores
"""Where pass 2 and the table checks read group files: one run's store, or a fan-out's parts."""


# ------------------------------------------------------------------------- pass 1: a group


@dataclass(frozen=True)
class GroupJob:
    """Everything a worker needs to run one group (pickled to it): ``src`` is the group's source
    as the plan says to read it."""

    group: Group
    src: Source
    cfg: PrepareDataConfig
    common: CommonConfig
    store: GroupFiles
    reuse_only: bool = False  # a fan-out's merge: the group must be finished in its part


@dataclass
class GroupResult:
    """What the parent gets back of a group: one outcome per sample in stream order (a marker entry
    without the captions, label and sizes, which the parent reads from the marker when it needs
    them), whether the group was reused from an earlier run, and the worker's log records."""

    samples: list[dict[str, Any]]
    reused: bool = False
    logs: list[LogLine] = field(default_factory=list)


def _slim(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Marker entries with only the hashes of their record."""
    out = []
    for s in samples:
        if "record" in s:
            s = {**s, "record": {k: s["record"][k] for k in ("pixel_hash", "caption_hash")}}
        out.append(s)
    return out


def _stamp(path: str, endpoint_url: str) -> list | None:
    """Size and change time (local) or size and ETag (S3) of an input file; None if none."""
    try:
        if is_remote(path):
            info = s3_filesystem(endpoint_url).info(path)
            return [info.get("size"), info.get("ETag")]
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns] if os.path.isfile(path) else None
    except (OSError, ValueError):
        return None


def fingerprint(job: GroupJob) -> str:
    """What a group's files depend on: the source's config, the group, the validation and image
    settings, the caption fields, the seed, and the stamps of its input files (the group's shard,
    and every local file a source field names; a manifest's images are not stamped)."""
    src, ep = to_dict(job.src), job.common.s3_endpoint_url
    named = [v for v in src.values() if isinstance(v, str) and v and not is_remote(v) and os.path.isfile(v)]
    inputs = {p: _stamp(p, ep) for p in [*named, *filter(None, [job.group.url])]}
    parts = [FORMAT, to_dict(job.group), src, to_dict(job.cfg.validation), job.cfg.image_max_side,
             job.cfg.jpeg_quality, list(job.common.caption_fields), job.common.seed, inputs]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(job: GroupJob, print_: str) -> dict[str, Any] | None:
    """The marker of an earlier run's group when it is complete and made from the same inputs."""
    marker = job.store.read_json(f"{job.group.name}.json")
    if not marker or marker.get("fingerprint") != print_:
        return None
    return marker if job.store.sha256(f"{job.group.name}.tar") == marker.get("tar_sha256") else None


# The SampleRecord fields a marker keeps for a kept sample (besides key and source_id).
RECORD_FIELDS = ("label", "captions", "width", "height", "orig_width", "orig_height", "pixel_hash", "caption_hash")


def _outcome(raw: RawSample, job: GroupJob, writer: ShardWriter) -> dict[str, Any]:
    """Validate one raw sample; a kept one's members go into the group tar. Its marker entry."""
    out: dict[str, Any] = {"key": raw.key, "source_id": raw.source_id, "line": raw.line}
    if raw.error is not None:  # the source could not read it: rejected whatever its key
        return {**out, "error": list(raw.error), "source_error": True}
    stats: Counter = Counter()
    cfg, fields = job.cfg, job.common.caption_fields
    try:
        record, jpg = validate_sample(raw, fields, cfg.validation, max_side=cfg.image_max_side,
                                      jpeg_quality=cfg.jpeg_quality, stats=stats)
    except SampleRejected as rej:
        out["error"] = [rej.reason, rej.detail]
    else:
        where = writer.write(record.key, {"jpg": jpg, "json": encode_meta(record.meta(fields))})
        out["record"] = {k: getattr(record, k) for k in RECORD_FIELDS}
        out["jpg"], out["json"] = where["jpg"], where["json"]
    if stats:
        out["stats"] = dict(stats)
    return out


def run_group(job: GroupJob) -> GroupResult:
    """Pass 1 of one group (runs in a worker): its tar, then its marker; or the earlier run's.

    Every sample is validated, whatever its key: whether a key is already taken is decided by
    the parent, which sees the groups in order.
    """
    print_ = fingerprint(job)
    if (marker := _reusable(job, print_)) is not None:
        return GroupResult(_slim(marker["samples"]), reused=True, logs=captured_logs())
    if job.reuse_only:
        part = job.group.number % len(job.store.parts)
        raise StageError(f"prepare_data: group {job.group.name} is not finished in group part {part} of "
                         f"{len(job.store.parts)}, or its files changed since; re-run that group task "
                         f"(llm2clip prepare_data --part {part}/{len(job.store.parts)})")
    with muted():  # the parent logged what opening the source says when it planned the groups
        samples = group_samples(job.group, job.src, job.common)
    name = job.group.name
    with job.store.local_file(f"{name}.tar") as path:
        with ShardWriter(path) as writer:
            outcomes = [_outcome(raw, job, writer) for raw in samples]
        tar_sha256 = shard_entry(path, writer.count)["sha256"]
    marker = {"format": FORMAT, "fingerprint": print_, "group": to_dict(job.group),
              "source": job.src.name, "tar_sha256": tar_sha256, "samples": outcomes}
    with job.store.local_file(f"{name}.json") as path:
        _write_json(path, marker)
    return GroupResult(_slim(outcomes), logs=captured_logs())


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, separators=(",", ":")))


# ------------------------------------------------------------------------ pass 2: a shard


FETCH_BATCH = 256  # samples a pass-2 worker holds at once


@dataclass(frozen=True)
class ShardJob:
    """One output shard: its name and its samples in order, each ``(key, group name, jpg offset,
    jpg length, json offset, json length)``: where its two members are in the group's tar."""

    name: str
    items: list[tuple[str, str, int, int, int, int]]
    groups: GroupFiles
    output: Store


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Pass 2 of one output shard (runs in a worker); returns its manifest entry.

    The samples are fetched :data:`FETCH_BATCH` at a time (one read per sample, concurrent on S3)
    and written in the shard's order: the same bytes as one process writing them.
    """
    with job.output.local_file(job.name) as path:
        with ShardWriter(path) as writer:
            for start in range(0, len(job.items), FETCH_BATCH):
                batch = job.items[start : start + FETCH_BATCH]
                for (key, _, jpg_at, jpg_len, json_at, json_len), blob in zip(batch, _fetch(batch, job.groups),
                                                                               strict=True):
                    json_from = json_at - jpg_at
                    writer.write(key, {"jpg": blob[:jpg_len], "json": blob[json_from : json_from + json_len]})
        return shard_entry(path, writer.count)


def _fetch(items: list[tuple[str, str, int, int, int, int]], store: GroupFiles) -> list[bytes]:
    """The bytes from a sample's jpg to the end of its json, for each item, in order (one read
    per sample, each group tar opened once)."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for i, (_, group, *_) in enumerate(items):
        wanted[group].append(i)
    fetched: dict[int, bytes] = {}
    for group, positions in wanted.items():
        spans = [(items[i][2], items[i][4] + items[i][5]) for i in positions]
        fetched.update(zip(positions, store.read_ranges(f"{group}.tar", spans), strict=True))
    return [fetched[i] for i in range(len(items))]
