"""register: the evaluated model into the MLflow registry, with lineage tags and the alias gate.

Refuses without evaluation metrics, a report of another model, a caption encoder other than the
one the model was trained with (:mod:`llm2clip.lineage`), and (``require_gate``) when evaluate's
quality gate failed.
Every new version gets ``challenger``; ``champion`` moves only past ``promote_margin``. A rerun on
the same inputs returns the existing version. Writes ``registration/registration.json`` and
``manifest.json`` (model URI, version, aliases, decision).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip import lineage, tracking
from llm2clip.config import CommonConfig, RegisterConfig, config_hash
from llm2clip.contracts import read_manifest, write_manifest
from llm2clip.io import StageError, atomic_write_json, is_remote, output_dir, s3_filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    registration: str
    model_uri: str
    version: str
    aliases: tuple[str, ...]
    promoted: bool
    reused: bool

    def summary(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "version": self.version, "aliases": list(self.aliases),
                "promoted": self.promoted, "reused": self.reused, "registration": self.registration}


def _read_json(directory: str, name: str, endpoint: str) -> dict[str, Any]:
    path = f"{str(directory).rstrip('/')}/{name}"
    if is_remote(path):
        return json.loads(s3_filesystem(endpoint).cat(path))
    if not Path(path).is_file():
        raise StageError(f"{path} not found: run the evaluate stage first (dvc repro evaluate)")
    return json.loads(Path(path).read_text())


def run(cfg: RegisterConfig, common: CommonConfig, *, vision_model: str, caption_encoder: str, report: str,
        registration: str, pipeline_run_id: str = "") -> RegisterResult:
    """Register ``vision_model`` (and its ``caption_encoder``) using the metrics in ``report``.

    Raises:
        StageError: tracking off, no evaluation, a report of another model, a caption encoder
            other than the model's (each naming the stage to re-run), or a failed quality gate.
    """
    from llm2clip.registry import register_model

    if not common.tracking:
        raise StageError("register needs MLflow: set common.tracking: true (and a tracking URI)")
    endpoint = common.s3_endpoint_url
    evaluation = read_manifest("evaluate", report, endpoint)
    lineage.check_report_for_model(report, evaluation, vision_model, endpoint)
    lineage.check_encoder_for_model(caption_encoder, lineage.read_model_lineage(vision_model, endpoint),
                                    report, evaluation)
    metrics = _read_json(report, evaluation.get("metrics", "metrics.json"), endpoint)
    if cfg.require_gate and not evaluation.get("gate_passed", False):
        raise StageError(
            f"quality gate failed: {evaluation.get('primary_metric')} = {evaluation.get('primary')} < "
            f"{evaluation.get('min_primary')}; not registering (set register.require_gate: false to "
            "register anyway)")
    inputs = {"vision_model": vision_model, "caption_encoder": caption_encoder, "report": report}
    tags = {
        "git_rev": tracking.git_revision(), "params_hash": config_hash(common, cfg),
        "kfp_run_id": pipeline_run_id, "eval_protocol": evaluation.get("protocol", ""),
        "primary_metric": evaluation["primary_metric"],
        **{f"data_sha256.{k}": v for k, v in evaluation.get("inputs", {}).items()},
    }
    with tracking.stage_run("register", cfg, common, inputs=inputs, pipeline_run_id=pipeline_run_id) as tracker, \
            output_dir(registration, endpoint) as out:
        result = register_model(
            vision_model, caption_encoder, metrics, name=common.registered_model,
            primary_metric=evaluation["primary_metric"], promote_margin=cfg.promote_margin,
            tracking_uri=tracking.resolve_tracking_uri(common), tags=tags, experiment=common.experiment,
            run_id=tracker.run_id, caption_encoder_name=cfg.caption_encoder_name or None)
        record = {**result.to_dict(), "champion_uri": f"models:/{result.name}@champion",
                  "tracking_uri": tracking.resolve_tracking_uri(common)}
        atomic_write_json(out / "registration.json", record)
        tracker.set_tags({"llm2clip.registered_model": f"{result.name}/{result.version}"})
        tracker.log_metrics({"promoted": float(result.promoted), "reused": float(result.reused)})
        write_manifest("register", out, {
            "model_uri": result.model_uri, "alias": list(result.aliases),
            "version": result.version, "promoted": result.promoted, "reused": result.reused,
            "metrics": {evaluation["primary_metric"]: result.metric}, "champion_uri": record["champion_uri"],
            "reason": result.reason,
        })
    log.info("registered %s version %s (aliases %s): %s", result.name, result.version,
             ", ".join(result.aliases) or "none", result.reason)
    return RegisterResult(registration=str(registration), model_uri=result.model_uri, version=str(result.version),
                          aliases=tuple(result.aliases), promoted=result.promoted, reused=result.reused)
