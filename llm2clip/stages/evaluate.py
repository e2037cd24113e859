"""evaluate: retrieval and zero-shot metrics of the trained model, compared, gated, reported.

Scores every ``evaluate.eval_sets`` entry: the pipeline's own data, explicit dirs, or a prepared
evaluation set found by name among ``eval_data``/``eval_embeddings`` (:mod:`llm2clip.eval.inputs`).
Writes into the ``report`` directory: ``metrics.json`` (flat, DVC metrics), ``plots/`` (recall@k
curves as CSV for DVC plots, and PNG), ``paper_table.json`` (the paper-layout table,
:mod:`llm2clip.eval.paper_table`), ``report.md`` + ``report.html``, and ``manifest.json``
(primary metric, gate decision, protocol, input fingerprints, the caption encoder of the scored
embeddings) last. Before anything is scored, every eval set's embeddings must belong to its data
and be of the caption encoder and width the model was trained on (:mod:`llm2clip.lineage`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llm2clip import lineage, tracking
from llm2clip.config import CommonConfig, EvaluateConfig, config_hash
from llm2clip.contracts import read_manifest, write_manifest
from llm2clip.eval.harness import PROTOCOL, embed_set, headline_choice, set_metrics
from llm2clip.eval.inputs import ResolvedSet, resolve_eval_sets
from llm2clip.eval.paper_table import SetSummary, build_paper_table
from llm2clip.eval.published import match_release
from llm2clip.eval.report import ReportSection, write_metrics_json, write_recall_plots, write_report
from llm2clip.io import StageError, atomic_write_json, dir_fingerprint, output_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    report: str
    primary_metric: str
    primary: float
    gate_passed: bool
    metrics: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "metrics"}


def _evaluate(model: Any, cfg: EvaluateConfig, sets: Sequence[ResolvedSet], endpoint: str):
    """Every set's metrics and recall curves, and what the paper table says of each set."""
    metrics: dict[str, float] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    summaries: list[SetSummary] = []
    for s in sets:
        c = s.config
        embedded = embed_set(model, s.data, s.embeddings, s.split, batch_size=cfg.batch_size,
                             endpoint_url=endpoint, cra=c.cra)
        set_values, curves[c.name] = set_metrics(embedded, c.name, max_k=cfg.recall_max_k, protocol=c.protocol,
                                                 caption_field=c.caption_field, cra=c.cra)
        metrics.update(set_values)
        field, protocol = headline_choice(embedded, c.protocol, c.caption_field) or ("", "")
        summaries.append(SetSummary(c.name, c.column or c.name, protocol, field, len(embedded.image_emb)))
    return metrics, curves, summaries


def _load_model(path: str, what: str) -> Any:
    """``LLM2CLIPModel.from_pretrained(path)``; a directory that is no model is a StageError."""
    from llm2clip.vision.model import LLM2CLIPModel

    try:
        return LLM2CLIPModel.from_pretrained(path)
    except ValueError as err:
        raise StageError(f"{what} {path}: {err}; {lineage.rerun('train_vision')}") from err


def _check_inputs(cfg: EvaluateConfig, resolved: Sequence[ResolvedSet], vision_model: str, endpoint: str):
    """Load the model (and baseline); refuse eval sets whose embeddings it cannot score.

    Returns:
        ``(model, baseline or None, fingerprint of the caption encoder that made the embeddings)``.
    """
    sets = [(s.name, s.data, s.embeddings) for s in resolved]
    model = _load_model(vision_model, "vision_model")
    trained = lineage.ModelLineage(str(vision_model), model.llm_dim, model.caption_encoder_fingerprint)
    encoder = lineage.check_eval_sets(trained, sets, endpoint)
    baseline = None
    if cfg.baseline_model:
        baseline = _load_model(cfg.baseline_model, "evaluate.baseline_model")
        lineage.check_eval_sets(lineage.ModelLineage(cfg.baseline_model, baseline.llm_dim,
                                                     baseline.caption_encoder_fingerprint), sets, endpoint)
    return model, baseline, encoder


def _champion_metrics(cfg: EvaluateConfig, common: CommonConfig) -> dict[str, float]:
    if not (cfg.compare_champion and common.tracking):
        return {}
    from llm2clip.registry import champion_metrics

    return champion_metrics(common.registered_model, tracking.resolve_tracking_uri(common))


def _published_for(vision_model: str, model: Any, endpoint: str):
    """The released model ``vision_model`` is an import of (:func:`llm2clip.eval.published.match_release`)."""
    try:
        manifest = read_manifest("train_vision", vision_model, endpoint)
    except StageError as err:  # a hand-made or older model dir: not an import
        log.info("evaluate: %s; no published numbers", err)
        return None
    image_size = getattr(getattr(getattr(model, "tower", None), "preprocess", None), "image_size", None)
    try:
        return match_release(manifest.get("imported_from"), image_size)
    except (OSError, ValueError) as err:  # the data file missing from an install, or broken: no row
        log.warning("evaluate: cannot read the published numbers (%s); the report has no paper row", err)
        return None


def _eval_set_inputs(resolved: Sequence[ResolvedSet], data: str, embeddings: str, endpoint: str) -> dict:
    """Dirs and manifest fingerprints of the sets that score other dirs than the pipeline's own."""
    return {s.name: {"data": s.data, "embeddings": s.embeddings, "split": s.split,
                     "data_sha256": dir_fingerprint(s.data, endpoint),
                     "embeddings_sha256": dir_fingerprint(s.embeddings, endpoint)}
            for s in resolved if (s.data, s.embeddings) != (data, embeddings)}


def run(cfg: EvaluateConfig, common: CommonConfig, *, data: str, embeddings: str, vision_model: str,
        report: str, eval_data: Sequence[str] = (), eval_embeddings: Sequence[str] = (),
        pipeline_run_id: str = "") -> EvaluateResult:
    """Evaluate ``vision_model`` on every eval set; write metrics, plots, report and the gate.

    Args:
        eval_data: prepare_data outputs of evaluation sets (``prepare_data --eval-set``), or
            folders of them; an eval set with ``eval_data: NAME`` scores the one named NAME.
        eval_embeddings: Their embed_captions outputs (or folders of them).

    Raises:
        StageError: an unfinished input, a named eval set that was not prepared or embedded,
            embeddings that do not belong to the data, or embeddings of another caption encoder or
            width than the model was trained on (naming the stage to re-run); a primary metric
            that was not computed.
    """
    inputs = {"data": data, "embeddings": embeddings, "vision_model": vision_model}
    endpoint = common.s3_endpoint_url
    fingerprints = {k: dir_fingerprint(v, endpoint) for k, v in inputs.items()}
    resolved = resolve_eval_sets(cfg.eval_sets, data, embeddings, eval_data, eval_embeddings, endpoint)
    model, baseline, encoder = _check_inputs(cfg, resolved, vision_model, endpoint)
    set_inputs = _eval_set_inputs(resolved, data, embeddings, endpoint)
    tracked = inputs | {f"eval.{n}.{k}": v[k] for n, v in set_inputs.items() for k in ("data", "embeddings")}
    with tracking.stage_run("evaluate", cfg, common, inputs=tracked,
                            pipeline_run_id=pipeline_run_id) as tracker, output_dir(report, endpoint) as out:
        metrics, curves, summaries = _evaluate(model, cfg, resolved, endpoint)
        if cfg.primary_metric not in metrics:
            raise StageError(f"evaluate.primary_metric {cfg.primary_metric!r} is not among the "
                             f"metrics: {sorted(metrics)}")
        comparisons = {"champion": _champion_metrics(cfg, common)}
        if baseline is not None:
            comparisons["baseline"] = _evaluate(baseline, cfg, resolved, endpoint)[0]
        primary = metrics[cfg.primary_metric]
        gate = primary >= cfg.min_primary
        metrics["gate_passed"] = float(gate)
        write_metrics_json(out / "metrics.json", metrics)
        published = _published_for(vision_model, model, endpoint)
        table = build_paper_table(summaries, {"this model": metrics, **{k: v for k, v in comparisons.items() if v}},
                                  published=published, llm_dim=model.llm_dim)
        atomic_write_json(out / "paper_table.json", table.to_json())
        log.info("evaluate: in the paper's layout\n%s", "\n".join(table.markdown()))
        sections = []
        for name, set_curves in curves.items():
            plot = None
            if set_curves:  # a set without captions (ImageNet) has no recall curve
                plot = write_recall_plots(out / "plots", set_curves, name=f"recall_{name}",
                                          title=f"{name}: recall@k (1:1)")["png"]
            mine = {k.removeprefix(f"{name}."): v for k, v in metrics.items() if k.startswith(f"{name}.")}
            refs = {ref: {k.removeprefix(f"{name}."): v for k, v in values.items()
                          if k.startswith(f"{name}.")} for ref, values in comparisons.items() if values}
            sections.append(ReportSection(name, metrics=mine, comparisons=refs, plot=plot))
        meta = {"primary metric": f"{cfg.primary_metric} = {primary:.4f}",
                "quality gate": f"{'passed' if gate else 'FAILED'} (min {cfg.min_primary})",
                "protocol": PROTOCOL, "caption encoder": encoder[:16],
                **{f"{k} sha256": v[:16] for k, v in fingerprints.items()}}
        write_report(out / "report.md", out / "report.html", sections, meta=meta, paper_table=table)
        write_manifest("evaluate", out, {
            "config_hash": config_hash(common, cfg),
            "primary_metric": cfg.primary_metric, "primary": primary, "min_primary": cfg.min_primary,
            "gate_passed": gate, "protocol": PROTOCOL, "inputs": fingerprints,
            "eval_sets": [s.name for s in cfg.eval_sets], "metrics": "metrics.json",
            "champion": comparisons["champion"] or None,
            "caption_encoder": {"fingerprint": encoder, "embedding_dim": model.llm_dim},
            "eval_set_inputs": set_inputs, "paper_table": "paper_table.json",
            "published": (table.published or {}).get("model"),
        })
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / "report.html", "report")
        tracker.log_artifact(out / "report.md", "report")
        tracker.log_artifact(out / "paper_table.json", "report")
        if (out / "plots").is_dir():
            tracker.log_artifact(out / "plots", "report/plots")
    log.info("evaluate: %s = %.4f (gate %s); report in %s", cfg.primary_metric, primary,
             "passed" if gate else "FAILED", report)
    return EvaluateResult(report=str(report), primary_metric=cfg.primary_metric, primary=primary,
                          gate_passed=gate, metrics=metrics)
