"""prepare_data: image-caption sources -> validated, deduplicated, split webdataset shards.

Writes into ``data`` (local or ``s3://``): ``{train,val}-NNNNNN.tar`` shards (an evaluation set,
``prepare_data.eval_set``: ``test-NNNNNN.tar`` only), ``quarantine.jsonl``, ``validation/``
(great-expectations result + Data Docs + preview) and, last, ``manifest.json``.
The logic lives in :mod:`llm2clip.data`; this module only orders the steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from llm2clip import tracking
from llm2clip.config import CommonConfig, PrepareDataConfig, config_hash
from llm2clip.contracts import write_manifest
from llm2clip.data import collect, quality, report
from llm2clip.data.shards import invalidate, run_splits
from llm2clip.data.sources import check_caption_mapping, open_source
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
    cfg: PrepareDataConfig, common: CommonConfig, *, data: str, pipeline_run_id: str = ""
) -> PrepareDataResult:
    """Read every source, validate, deduplicate, split and write the shards to ``data``.

    With ``cfg.eval_set`` (an evaluation set) every kept sample goes into the one split ``test``
    and nothing is dropped as a duplicate (a benchmark is scored as published); keys that
    collide are still quarantined.

    Raises:
        StageError: a source mapping does not cover ``common.caption_fields``, too few samples
            pass validation (``validation.min_valid_fraction``) or a critical expectation fails.
    """
    start = time.monotonic()
    fields, names = common.caption_fields, [s.name for s in cfg.sources]
    check_caption_mapping(cfg.sources, fields)
    with tracking.stage_run(
        "prepare_data", cfg, common, inputs={}, pipeline_run_id=pipeline_run_id
    ) as tracker:
        invalidate(data, common.s3_endpoint_url)
        with output_dir(data, common.s3_endpoint_url) as out, collect.SpillFile() as spill:
            # pass 1: validate every sample; then drop exact duplicates and assign splits
            found = collect.collect((open_source(s, common) for s in cfg.sources), cfg, common, spill)
            kept, duplicates = (found.records, []) if cfg.eval_set else collect.dedupe(found.records)
            shared = collect.assign_splits(kept, cfg.val_fraction, cfg.eval_set)
            rejects = found.rejects + duplicates
            counts = report.counts(found, kept, rejects, names, shared, run_splits(cfg.eval_set))
            collect.write_quarantine(out / "quarantine.jsonl", rejects)

            # the table-level gate, reported before anything is judged
            validation = out / "validation"
            report.write_preview(validation / report.PREVIEW_FILE, kept, spill, fields)
            table = quality.sample_table(kept, fields)
            checked = quality.run_expectations(table, cfg, fields, names, validation)
            tracker.log_metrics(report.metrics(counts))
            tracker.log_artifact(validation, "validation")
            tracker.log_artifact(out / "quarantine.jsonl")
            quality.check_gate(counts, checked, cfg, str(data))

            # pass 2: shards, then the manifest as the commit mark
            shards = collect.write_shards(out, kept, spill, cfg, common)
            manifest = report.manifest(cfg, common, counts, shards, kept, checked)
            write_manifest("prepare_data", out, manifest)
            tracker.log_artifact(out / "manifest.json")
        n_shards = sum(len(v) for v in shards.values())
        tracker.log_metrics({"shards": n_shards, "seconds": time.monotonic() - start})
        report.log_summary(manifest, str(data))
    return PrepareDataResult(
        data=str(data), train=counts.get("train", 0), val=counts.get("val", 0), test=counts.get("test", 0),
        quarantined=counts["quarantined"],
        seen=counts["seen"], shards=n_shards, config_hash=config_hash(common, cfg),
    )
