"""The table-level gate: a great-expectations suite over the kept samples, and the stage gate.

The suite runs on a pandas table with one row per kept sample. Each expectation carries
``meta.critical``: a failed critical one fails the stage; the others are logged as warnings.
The result JSON and the Data Docs HTML are saved under ``validation/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.config import PrepareDataConfig
from llm2clip.data.records import KEY_PATTERN, SampleRecord
from llm2clip.data.shards import TRAIN_SPLITS, run_splits
from llm2clip.io import StageError, atomic_write_json

log = logging.getLogger(__name__)

RESULT_FILE = "expectations.json"
DOCS_DIR = "data_docs"


@dataclass(frozen=True)
class QualityReport:
    """Outcome of the great-expectations suite (paths relative to the output directory)."""

    success: bool
    evaluated: int
    critical_failures: tuple[str, ...]
    warnings: tuple[str, ...]
    result: str = f"validation/{RESULT_FILE}"
    data_docs: str = f"validation/{DOCS_DIR}/index.html"


def sample_table(records: list[SampleRecord], caption_fields: tuple[str, ...]):
    """One row per kept sample: key, split, source, sizes and per-field caption statistics."""
    import pandas as pd

    rows = []
    for r in records:
        row: dict[str, Any] = {
            "key": r.key, "split": r.split, "source": r.source, "label": r.label,
            "width": r.width, "height": r.height, "orig_width": r.orig_width, "orig_height": r.orig_height,
        }
        for name in caption_fields:
            caps = r.captions.get(name) or []
            lengths = [len(c) for c in caps]
            row[f"caption_{name}"] = caps[0] if caps else None
            row[f"caption_{name}_count"] = len(caps)
            row[f"caption_{name}_min_chars"] = min(lengths) if caps else None  # null: not checked
            row[f"caption_{name}_max_chars"] = max(lengths) if caps else None
        rows.append(row)
    columns = ["key", "split", "source", "label", "width", "height", "orig_width", "orig_height"]
    for name in caption_fields:
        columns += [f"caption_{name}{s}" for s in ("", "_count", "_min_chars", "_max_chars")]
    return pd.DataFrame(rows, columns=columns)


def expectations(cfg: PrepareDataConfig, caption_fields: tuple[str, ...], sources: list[str]) -> list:
    """The suite: ``(expectation, critical)`` pairs.

    Splits are those of the run (``test`` only for an evaluation set). Without caption fields (a
    labelled image set such as ImageNet) there are no caption columns to check and every sample
    must have a label instead.
    """
    import great_expectations.expectations as gxe

    v = cfg.validation
    crit: list = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=v.max_rows),
        gxe.ExpectColumnValuesToNotBeNull(column="key"),
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        gxe.ExpectColumnValuesToMatchRegex(column="key", regex=KEY_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(run_splits(cfg.eval_set))),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=sources),
        gxe.ExpectColumnValuesToBeBetween(column="orig_width", min_value=v.min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column="orig_height", min_value=v.min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=cfg.image_max_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1, max_value=cfg.image_max_side),
    ]
    optional = {n for s in cfg.sources for n in getattr(s, "optional_captions", ())}
    for name in caption_fields:
        col = f"caption_{name}"
        if name not in optional:  # a sample may lack an optional field (an empty caption list)
            crit += [
                gxe.ExpectColumnValuesToNotBeNull(column=col),
                gxe.ExpectColumnValuesToBeBetween(column=f"{col}_count", min_value=1),
            ]
        crit += [
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=col, min_value=v.min_caption_chars, max_value=v.max_caption_chars
            ),
            gxe.ExpectColumnValuesToBeBetween(column=f"{col}_min_chars", min_value=v.min_caption_chars),
            gxe.ExpectColumnValuesToBeBetween(column=f"{col}_max_chars", max_value=v.max_caption_chars),
        ]
    if not caption_fields:  # a labelled image set: the label is all there is to score
        crit.append(gxe.ExpectColumnValuesToNotBeNull(column="label"))
    warn: list = []
    if caption_fields:  # nearly all captions alike means a broken source or mapping, not a data set
        warn.append(gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=f"caption_{caption_fields[0]}", min_value=0.05
        ))
    if cfg.val_fraction > 0 and not cfg.eval_set:
        warn.append(gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(TRAIN_SPLITS)))
    return [(e, True) for e in crit] + [(e, False) for e in warn]


def _describe(result) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    res = result.result or {}
    found = res.get("observed_value", res.get("partial_unexpected_list", ""))
    return f"{cfg.type}({kwargs}): unexpected {res.get('unexpected_count', '-')}, observed {str(found)[:200]}"


def run_expectations(
    table, cfg: PrepareDataConfig, caption_fields: tuple[str, ...], sources: list[str], directory: Path
) -> QualityReport:
    """Validate ``table`` with great-expectations; write the result JSON and the Data Docs.

    Args:
        table: The :func:`sample_table` of the kept samples.
        directory: The output's ``validation/`` folder.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # its INFO chatter drowns the stage's own log
        gx_log.setLevel(logging.WARNING)
    import great_expectations as gx

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f".{DOCS_DIR}.tmp-*"):  # from a run that crashed here
        shutil.rmtree(leftover, ignore_errors=True)
    docs_tmp = Path(tempfile.mkdtemp(prefix=f".{DOCS_DIR}.tmp-", dir=directory))
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(site_name="local", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_tmp.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    batch = ctx.data_sources.add_pandas("prepare_data").add_dataframe_asset("samples")
    suite = ctx.suites.add(gx.ExpectationSuite(name="prepare_data_samples"))
    for expectation, critical in expectations(cfg, caption_fields, sources):
        expectation.meta = {"critical": critical}
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(
        name="samples", data=batch.add_batch_definition_whole_dataframe("all"), suite=suite
    ))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="prepare_data", validation_definitions=[definition], result_format="SUMMARY",
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"])],
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": table})
    (result,) = outcome.run_results.values()
    atomic_write_json(directory / RESULT_FILE, result.to_json_dict())
    shutil.rmtree(directory / DOCS_DIR, ignore_errors=True)
    os.replace(docs_tmp, directory / DOCS_DIR)
    failed = [r for r in result.results if not r.success]
    critical = tuple(_describe(r) for r in failed if r.expectation_config.meta.get("critical", True))
    warnings = tuple(_describe(r) for r in failed if not r.expectation_config.meta.get("critical", True))
    for w in warnings:
        log.warning("great-expectations (non-critical): %s", w)
    return QualityReport(bool(result.success), len(result.results), critical, warnings)


def check_gate(counts: dict[str, Any], report: QualityReport, cfg: PrepareDataConfig, where: str) -> None:
    """Fail the stage when too few samples survived or a critical expectation failed.

    Raises:
        StageError: with the numbers, the top reasons and what to do.
    """
    seen, valid = counts["seen"], counts["valid"]
    if seen == 0:
        raise StageError(
            "no samples were read from any source; check prepare_data.sources "
            f"(skipped: {counts.get('skipped') or 'none'})"
        )
    fraction = valid / seen
    if fraction < cfg.validation.min_valid_fraction:
        top = sorted(counts["per_reason"].items(), key=lambda kv: -kv[1])[:5]
        reasons = ", ".join(f"{k} {v}" for k, v in top)
        raise StageError(
            f"only {valid} of {seen} samples ({fraction:.1%}) passed validation, below "
            f"prepare_data.validation.min_valid_fraction {cfg.validation.min_valid_fraction:.1%}; "
            f"rejections by reason: {reasons}. Every rejected sample and why is in "
            f"{where}/quarantine.jsonl: fix the source data, or lower min_valid_fraction if "
            "this share of bad samples is expected"
        )
    if report.critical_failures:
        raise StageError(
            f"{len(report.critical_failures)} critical great-expectations check(s) failed: "
            + "; ".join(report.critical_failures)
            + f". Report: {where}/{report.data_docs}"
        )
