"""prepare_data: image-caption sources -> validated, deduplicated, split webdataset shards.

Writes into ``data`` (local or ``s3://``): ``{train,val}-NNNNNN.tar`` shards (an evaluation set,
``prepare_data.eval_set``: ``test-NNNNNN.tar`` only), ``quarantine.jsonl``, ``validation/``
(great-expectations result + Data Docs + preview) and, last, ``manifest.json``.
The logic lives in :mod:`llm2clip.data`; this module only orders the steps.

What runs where: ``prepare_data.workers`` processes (:mod:`llm2clip.data.pool`; this process
itself for one worker, and for a small run with ``workers: 0``) validate and re-encode the
sources group by group (pass 1, :mod:`llm2clip.data.groups`) into intermediate files under
``data/.groups/``, and later write the output shards (pass 2). This process plans the groups,
merges their outcomes in order, dedupes, splits, runs the great-expectations gate and writes the
manifest (:mod:`llm2clip.data.collect`, :mod:`llm2clip.data.report`). The output is
byte-identical for any worker count. After a crash, a rerun reuses the groups that finished.

Across pods (a KFP fan-out, :mod:`llm2clip.data.parts`): :func:`run_part` is pass 1 of one
share of the groups into a part folder; ``run(..., parts=[folders])`` is the merge: it checks
every part, takes every group from its part (verified, never redone) and goes on as above.
The output is the same bytes as one process makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip import tracking
from llm2clip.config import CommonConfig, PrepareDataConfig
from llm2clip.contracts import write_manifest
from llm2clip.data import collect, groups, pool, quality, report
from llm2clip.data import parts as fanout
from llm2clip.data.shards import invalidate, run_splits
from llm2clip.data.sources import check_caption_mapping
from llm2clip.io import output_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareDataResult:
    """What prepare_data made (``summary()`` is what the CLI prints)."""

    data: str
    train: int
    val: int
    test: int
    quarantined: int
    seen: int
    shards: int
    config_hash: str

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run(
    cfg: PrepareDataConfig, common: CommonConfig, *, data: str, pipeline_run_id: str = "",
    parts: Sequence[str] = (),
) -> PrepareDataResult:
    """Read every source, validate, deduplicate, split and write the shards to ``data``.

    With ``cfg.eval_set`` (an evaluation set) every kept sample goes into the one split ``test``
    and nothing is dropped as a duplicate (a benchmark is scored as published); keys that
    collide are still quarantined.

    Args:
        parts: The merge of a fan-out: the folders :func:`run_part` wrote, one per part; pass 1
            then takes every group from its part instead of reading the sources.

    Raises:
        StageError: a source mapping does not cover ``common.caption_fields``, too few samples
            pass validation (``validation.min_valid_fraction``) or a critical expectation fails;
            a part that is missing, incomplete or made from other inputs.
    """
    start = time.monotonic()
    fields, names = common.caption_fields, [s.name for s in cfg.sources]
    check_caption_mapping(cfg.sources, fields)
    store: groups.GroupFiles = groups.groups_store(data, common.s3_endpoint_url)
    with tracking.stage_run(
        "prepare_data", cfg, common, inputs={}, pipeline_run_id=pipeline_run_id
    ) as tracker:
        invalidate(data, common.s3_endpoint_url)
        plan = groups.plan_groups(cfg, common)
        if parts:
            digest = groups.plan_digest(plan, cfg, common)
            checked_parts = fanout.read_parts(list(parts), "prepare_data", digest, common.s3_endpoint_url)
            store = groups.PartStores(tuple(groups.groups_store(f, common.s3_endpoint_url) for f, _ in checked_parts))
            tracker.log_metrics({"shard_groups": len(checked_parts),
                                 "group_seconds_max": max(r["seconds"] for _, r in checked_parts)})
        details = collect.Details(store)
        workers = groups.workers_for(plan, cfg.workers)
        window = 2 * workers if workers > 1 else 1  # jobs in flight: results the parent may hold at once
        with _executor(workers) as executor, output_dir(data, common.s3_endpoint_url) as out:
            # pass 1 (workers): validate every sample, group by group; then, from the kept rows
            # alone, drop exact duplicates and assign splits
            found = _pass1(plan, cfg, common, executor, window, store, details, reuse_only=bool(parts))
            kept, duplicates = (found.table, []) if cfg.eval_set else collect.dedupe(found.table)
            shared = collect.assign_splits(kept, cfg.val_fraction, cfg.eval_set)
            rejects = found.rejects + collect.duplicate_rejections(duplicates, found.table, details)
            counts = report.counts(found, kept.split_counts(), rejects, names, shared, run_splits(cfg.eval_set))
            collect.write_quarantine(out / "quarantine.jsonl", rejects)

            # the table-level gate, reported before anything is judged
            validation = out / "validation"
            checked, labels = _expectations(cfg, fields, kept, details, validation)
            tracker.log_metrics(report.metrics(counts))
            tracker.log_artifact(validation, "validation")
            tracker.log_artifact(out / "quarantine.jsonl")
            quality.check_gate(counts, checked, cfg, str(data))

            # pass 2 (workers): the shards; then the intermediate files go and the manifest,
            # the commit mark, comes last
            output = groups.Store(str(data), common.s3_endpoint_url)
            shards = collect.write_shards(executor, window, kept, cfg, common, store, output)
            store.remove()
            manifest = report.manifest(cfg, common, counts, shards, labels, checked)
            if plan.lineage:  # what a versioned source (kind dvc) read: repo, rev, the commit, path
                manifest["lineage"] = plan.lineage
            write_manifest("prepare_data", out, manifest)
            tracker.log_artifact(out / "manifest.json")
        n_shards = sum(len(v) for v in shards.values())
        tracker.log_metrics({"shards": n_shards, "workers": workers, "seconds": time.monotonic() - start})
        report.log_summary(manifest, str(data))
    return PrepareDataResult(
        data=str(data), train=counts.get("train", 0), val=counts.get("val", 0), test=counts.get("test", 0),
        quarantined=counts["quarantined"],
        seen=counts["seen"], shards=n_shards, config_hash=report.output_hash(common, cfg),
    )


def _expectations(
    cfg: PrepareDataConfig, fields: tuple[str, ...], kept: collect.KeptTable, details: collect.Details,
    validation: Path,
) -> tuple[quality.QualityReport, dict[str, set[str]]]:
    """The preview and the great-expectations suite over the kept samples (read back from the
    group files); returns the suite's outcome and each source's labels."""
    chosen = [(details.record(kept, r), details.jpg(kept, r)) for r in report.preview_rows(kept.source)]
    report.write_preview(validation / report.PREVIEW_FILE, chosen, fields)
    labels: dict[str, set[str]] = {}
    table = quality.sample_table(collect.kept_records(kept, details, labels), fields)
    names = [s.name for s in cfg.sources]
    return quality.run_expectations(table, cfg, fields, names, validation), labels


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor]:
    """The worker pool of one run; on an error, jobs not started yet are cancelled."""
    executor = pool.make_executor(workers)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _pass1(
    plan: groups.Plan, cfg: PrepareDataConfig, common: CommonConfig, executor: Executor, window: int,
    store: groups.GroupFiles, details: collect.Details, reuse_only: bool = False,
) -> collect.Collection:
    """Run the planned groups in the workers, merge their outcomes in group order."""
    if not isinstance(executor, pool.InlineExecutor):
        groups.forget_manifests()  # the workers parse their own
    jobs = (groups.GroupJob(group, plan.sources[group.source], cfg, common, store, reuse_only)
            for group in plan.groups)
    found = collect.collect(plan, pool.ordered_map(executor, groups.run_group, jobs, window), cfg, details)
    groups.forget_manifests()
    return found


@dataclass(frozen=True)
class PartResult:
    """What one group task of a fan-out made (``summary()`` is what the CLI prints)."""

    data_part: str
    part: int
    parts: int
    groups: int
    reused: int
    samples: int
    kept: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_part(
    cfg: PrepareDataConfig, common: CommonConfig, *, part: int, parts: int, data_part: str,
    pipeline_run_id: str = "",
) -> PartResult:
    """Pass 1 of group task ``part`` of ``parts``: validate and re-encode its share of the groups
    (:func:`~llm2clip.data.groups.in_part`) into ``data_part``, then write its ``part.json``.

    Every group task plans all groups the same way (the sources are opened, not read), so the
    shares need no coordination; a rerun reuses the groups it finished. Nothing is tracked in
    MLflow: the merge's run is the stage's.

    Raises:
        StageError: as :func:`run` for the sources; ValueError: a part outside ``0..parts-1``.
    """
    start = time.monotonic()
    fanout.check_part(part, parts)
    check_caption_mapping(cfg.sources, common.caption_fields)
    plan = groups.plan_groups(cfg, common)
    mine = [g for g in plan.groups if groups.in_part(g, part, parts)]
    store = groups.groups_store(data_part, common.s3_endpoint_url)
    workers = groups.workers_for(dataclasses.replace(plan, groups=mine, total=None), cfg.workers)
    reused = samples = kept = 0
    log.info("prepare_data: group part %d of %d: %d of %d groups, %d workers", part, parts, len(mine),
             len(plan.groups), workers)
    with _executor(workers) as executor:
        jobs = (groups.GroupJob(g, plan.sources[g.source], cfg, common, store) for g in mine)
        for result in pool.ordered_map(executor, groups.run_group, jobs, 2 * workers if workers > 1 else 1):
            pool.replay_logs(result.logs)
            reused += result.reused
            samples += len(result.samples)
            kept += sum("record" in s for s in result.samples)
    seconds = time.monotonic() - start
    fanout.write_part(data_part, "prepare_data", part, parts, groups.plan_digest(plan, cfg, common),
                      {"groups": [g.name for g in mine], "reused": reused, "samples": samples, "kept": kept,
                       "workers": workers, "seconds": seconds},
                      common.s3_endpoint_url)
    log.info("prepare_data: group part %d of %d done: %d groups (%d reused), %d samples, %d kept, %.1f s -> %s",
             part, parts, len(mine), reused, samples, kept, seconds, data_part)
    return PartResult(data_part=str(data_part), part=part, parts=parts, groups=len(mine), reused=reused,
                      samples=samples, kept=kept, seconds=seconds)


def run_import(common: CommonConfig, *, repo: str, path: str, data: str, pipeline_run_id: str = "") -> dict[str, Any]:
    """Start from a prepared dataset instead of preparing again: copy the prepare_data output that
    the git + DVC repository ``repo`` tracks at ``path``, at ``common.data_revision``, into
    ``data`` (checked: a prepare_data manifest whose every shard verifies), byte for byte, so
    later stages' lineage checks see the output that was versioned. The MLflow run records the
    revision and where the data came from (tags ``llm2clip.prepared_from``, ``llm2clip.prepared_commit``).

    Returns:
        The lineage ``{repo, rev, commit, path}``.

    Raises:
        StageError: see :func:`llm2clip.data.dvc_source.fetch_prepared`.
    """
    import shutil
    import tempfile

    from llm2clip.data.dvc_source import fetch_prepared
    from llm2clip.io import upload_dir

    with tracking.stage_run("prepare_data", PrepareDataConfig(), common, inputs={},
                            pipeline_run_id=pipeline_run_id) as tracker:
        invalidate(data, common.s3_endpoint_url)
        staging = Path(tempfile.mkdtemp(prefix="llm2clip-prepared-"))
        try:
            lineage = fetch_prepared(repo, path, common.data_revision, staging / "data")
            if "://" in str(data):
                upload_dir(staging / "data", str(data), common.s3_endpoint_url)
            else:  # every file in place, manifest.json last: the output reads complete only at the end
                target = Path(data)
                target.mkdir(parents=True, exist_ok=True)
                files = sorted((p for p in (staging / "data").rglob("*") if p.is_file()),
                               key=lambda p: p.name == "manifest.json")
                for file in files:
                    (target / file.relative_to(staging / "data")).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(file, target / file.relative_to(staging / "data"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        tracker.set_tags({"llm2clip.prepared_from": f"{repo}:{path}", "llm2clip.prepared_commit": lineage["commit"]})
    log.info("prepare_data: imported %s:%s at %s (commit %s) -> %s", repo, path, lineage["rev"], lineage["commit"],
             data)
    return lineage
