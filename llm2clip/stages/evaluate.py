"""evaluate: retrieval and zero-shot metrics of the trained model, compared, gated, reported.

Writes into the ``report`` directory: ``metrics.json`` (flat, DVC metrics), ``plots/`` (recall@k
curves as CSV for DVC plots, and PNG), ``report.md`` + ``report.html``, and ``manifest.json``
(primary metric, gate decision, protocol, input fingerprints, the caption encoder of the scored
embeddings) last. Before anything is scored, every eval set's embeddings must belong to its data
and be of the caption encoder and width the model was trained on (:mod:`llm2clip.lineage`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from llm2clip import lineage, tracking
from llm2clip.config import CommonConfig, EvaluateConfig, config_hash
from llm2clip.contracts import write_manifest
from llm2clip.eval.harness import PROTOCOL, embed_set, set_metrics
from llm2clip.eval.report import ReportSection, write_metrics_json, write_recall_plots, write_report
from llm2clip.io import StageError, dir_fingerprint, output_dir

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


def _evaluate(model: Any, cfg: EvaluateConfig, data: str, embeddings: str, endpoint: str):
    metrics: dict[str, float] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for eval_set in cfg.eval_sets:
        embedded = embed_set(model, eval_set.data or data, eval_set.embeddings or embeddings,
                             eval_set.split, batch_size=cfg.batch_size, endpoint_url=endpoint)
        set_values, curves[eval_set.name] = set_metrics(embedded, eval_set.name, max_k=cfg.recall_max_k)
        metrics.update(set_values)
    return metrics, curves


def _load_model(path: str, what: str) -> Any:
    """``LLM2CLIPModel.from_pretrained(path)``; a directory that is no model is a StageError."""
    from llm2clip.vision.model import LLM2CLIPModel

    try:
        return LLM2CLIPModel.from_pretrained(path)
    except ValueError as err:
        raise StageError(f"{what} {path}: {err}; {lineage.rerun('train_vision')}") from err


def _check_inputs(cfg: EvaluateConfig, data: str, embeddings: str, vision_model: str, endpoint: str):
    """Load the model (and baseline); refuse eval sets whose embeddings it cannot score.

    Returns:
        ``(model, baseline or None, fingerprint of the caption encoder that made the embeddings)``.
    """
    sets = [(s.name, s.data or data, s.embeddings or embeddings) for s in cfg.eval_sets]
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


def run(cfg: EvaluateConfig, common: CommonConfig, *, data: str, embeddings: str, vision_model: str,
        report: str, pipeline_run_id: str = "") -> EvaluateResult:
    """Evaluate ``vision_model`` on every eval set; write metrics, plots, report and the gate.

    Raises:
        StageError: an unfinished input, embeddings that do not belong to the data, or embeddings
            of another caption encoder or width than the model was trained on (naming the stage
            to re-run); a primary metric that was not computed.
    """
    inputs = {"data": data, "embeddings": embeddings, "vision_model": vision_model}
    endpoint = common.s3_endpoint_url
    fingerprints = {k: dir_fingerprint(v, endpoint) for k, v in inputs.items()}
    model, baseline, encoder = _check_inputs(cfg, data, embeddings, vision_model, endpoint)
    with tracking.stage_run("evaluate", cfg, common, inputs=inputs,
                            pipeline_run_id=pipeline_run_id) as tracker, output_dir(report, endpoint) as out:
        metrics, curves = _evaluate(model, cfg, data, embeddings, endpoint)
        if cfg.primary_metric not in metrics:
            raise StageError(f"evaluate.primary_metric {cfg.primary_metric!r} is not among the "
                             f"metrics: {sorted(metrics)}")
        comparisons = {"champion": _champion_metrics(cfg, common)}
        if baseline is not None:
            comparisons["baseline"] = _evaluate(baseline, cfg, data, embeddings, endpoint)[0]
        primary = metrics[cfg.primary_metric]
        gate = primary >= cfg.min_primary
        metrics["gate_passed"] = float(gate)
        write_metrics_json(out / "metrics.json", metrics)
        sections = []
        for name, set_curves in curves.items():
            plots = write_recall_plots(out / "plots", set_curves, name=f"recall_{name}",
                                       title=f"{name}: recall@k (1:1)")
            mine = {k.removeprefix(f"{name}."): v for k, v in metrics.items() if k.startswith(f"{name}.")}
            refs = {ref: {k.removeprefix(f"{name}."): v for k, v in values.items()
                          if k.startswith(f"{name}.")} for ref, values in comparisons.items() if values}
            sections.append(ReportSection(name, metrics=mine, comparisons=refs, plot=plots["png"]))
        meta = {"primary metric": f"{cfg.primary_metric} = {primary:.4f}",
                "quality gate": f"{'passed' if gate else 'FAILED'} (min {cfg.min_primary})",
                "protocol": PROTOCOL, "caption encoder": encoder[:16],
                **{f"{k} sha256": v[:16] for k, v in fingerprints.items()}}
        write_report(out / "report.md", out / "report.html", sections, meta=meta)
        write_manifest("evaluate", out, {
            "config_hash": config_hash(common, cfg),
            "primary_metric": cfg.primary_metric, "primary": primary, "min_primary": cfg.min_primary,
            "gate_passed": gate, "protocol": PROTOCOL, "inputs": fingerprints,
            "eval_sets": [s.name for s in cfg.eval_sets], "metrics": "metrics.json",
            "champion": comparisons["champion"] or None,
            "caption_encoder": {"fingerprint": encoder, "embedding_dim": model.llm_dim},
        })
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / "report.html", "report")
        tracker.log_artifact(out / "plots", "report/plots")
    log.info("evaluate: %s = %.4f (gate %s); report in %s", cfg.primary_metric, primary,
             "passed" if gate else "FAILED", report)
    return EvaluateResult(report=str(report), primary_metric=cfg.primary_metric, primary=primary,
                          gate_passed=gate, metrics=metrics)
