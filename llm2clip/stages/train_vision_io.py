"""The steps around the train_vision loop: input checks, model, checkpoint dir, val R@1, outputs.

The other half of :mod:`llm2clip.stages.train_vision`, which only orders the steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, TrainVisionConfig, config_hash
from llm2clip.contracts import remove_manifest, write_manifest
from llm2clip.data import sidecars
from llm2clip.data.shards import load_manifest
from llm2clip.eval.retrieval import clip_metrics
from llm2clip.io import StageError, atomic_write_json, dir_fingerprint, sha256_file
from llm2clip.lineage import check_made_from
from llm2clip.tower_kinds import tower_kind
from llm2clip.train import checkpoint, vision_data
from llm2clip.train.distributed import DistContext
from llm2clip.train.engine import effective_zero_stage
from llm2clip.vision.model import CONFIG_FILE, LLM2CLIPModel
from llm2clip.vision.towers import TowerSpec, read_pretrained_logit_scale

log = logging.getLogger(__name__)

STAGE = "train_vision"
# Settings that change how a run is watched or saved, not what it computes: a resumed run may
# change them and still continue its checkpoints.
_OPERATIONAL = ("resume", "log_every", "checkpoint_every", "keep_checkpoints", "val_batch_size",
                "val_max_samples", "verify_sidecar_files", "nproc_per_node")  # (the world size is kept)


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of a run (the same on every rank)."""

    data: str
    embeddings: str
    data_manifest: dict[str, Any]
    embeddings_manifest: dict[str, Any]
    data_sha256: str
    embeddings_sha256: str
    llm_dim: int
    fields: tuple[str, ...]
    weights: tuple[float, ...]
    train_samples: int
    val_samples: int

    @property
    def encoder(self) -> dict[str, Any]:
        return self.embeddings_manifest.get("encoder") or {}


def _probe_dim(data: str, embeddings: str, endpoint: str) -> int:
    for _, arrays in sidecars.iter_lockstep(data, embeddings, "train", endpoint_url=endpoint, decode=False):
        return int(next(iter(arrays.values())).shape[-1])
    raise StageError(f"{embeddings} holds no train embeddings")


def check_inputs(cfg: TrainVisionConfig, common: CommonConfig, data: str, embeddings: str,
                 verify: bool = True) -> Inputs:
    """Refuse inputs that are unfinished or do not belong together; resolve dim and caption mix.

    The manifest-level alignment (every image shard has a sidecar made from exactly that shard)
    is always checked, and that the embeddings were made from this data's manifest
    (:func:`llm2clip.lineage.check_made_from`); per-sample keys are checked while reading.
    ``verify`` and ``cfg.verify_sidecar_files`` add a full sha256 pass over the sidecars.
    """
    endpoint = common.s3_endpoint_url
    manifest = load_manifest(data, endpoint)
    emb = sidecars.verify_sidecars(data, embeddings, endpoint_url=endpoint, check_keys=False,
                                   check_files=verify and cfg.verify_sidecar_files)
    data_sha256 = dir_fingerprint(data, endpoint)
    check_made_from(data, embeddings, emb, data_sha256, consumer=STAGE)
    fields, weights = vision_data.resolve_caption_mix(cfg.caption_mix, common.caption_fields,
                                                      emb["caption_fields"])
    counts = {split: sum(s["count"] for s in shards) for split, shards in manifest["shards"].items()}
    if not counts.get("train"):
        raise StageError(f"{data} has no train samples; re-run prepare_data")
    dim = emb.get("dim") or _probe_dim(data, embeddings, endpoint)
    return Inputs(data, embeddings, manifest, emb, data_sha256,
                  dir_fingerprint(embeddings, endpoint), int(dim), fields, weights, counts["train"],
                  counts.get("val", 0))


def run_identity(cfg: TrainVisionConfig, common: CommonConfig, inputs: Inputs, world_size: int) -> dict:
    """What checkpoints belong to: a checkpoint of another identity is never resumed."""
    defaults = TrainVisionConfig()
    trained = dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in _OPERATIONAL})
    return {"config": config_hash(trained), "seed": common.seed, "world_size": world_size,
            "caption_fields": list(common.caption_fields), "data": inputs.data_sha256,
            "embeddings": inputs.embeddings_sha256}


def checkpoint_dir(cfg: TrainVisionConfig, common: CommonConfig, inputs: Inputs, out_url: str,
                   ctx: DistContext) -> tuple[checkpoint.CheckpointStore, Path | None]:
    """Prepare the checkpoint store and say where to resume from.

    Checkpoints live in ``<vision_model>/checkpoints``, local or on S3 (then every node stages
    them in ``$TMPDIR``, see :class:`~llm2clip.train.checkpoint.CheckpointStore`), so a lost pod
    or node resumes from the last one. The output's old ``manifest.json`` is removed first, so
    the output reads unfinished until this run ends.

    Returns:
        ``(store, resume_from)``; ``resume_from`` is None for a fresh start.
    """
    identity = run_identity(cfg, common, inputs, ctx.world_size)
    store = checkpoint.CheckpointStore.at(f"{str(out_url).rstrip('/')}/checkpoints", common.s3_endpoint_url)
    if ctx.is_main:
        _unfinish(out_url, common.s3_endpoint_url)
        if cfg.resume == "none":
            store.remove()
    ctx.barrier()
    checkpoint.prepare_dir(store, identity, ctx)
    if cfg.resume == "latest":
        return store, store.local
    if cfg.resume == "none":
        return store, None
    source = Path(cfg.resume)
    if checkpoint.latest_tag(source) is None:
        raise StageError(f"train_vision.resume: {source} holds no complete checkpoint (no 'latest')")
    return store, source


def _unfinish(out_url: str, endpoint_url: str) -> None:
    """Remove the output's ``manifest.json`` (the commit mark) before it is rewritten."""
    remove_manifest(out_url, endpoint_url)


def loss_name(cfg: TrainVisionConfig) -> str:
    """The loss to train with: ``train_vision.loss``, or (``auto``) the tower kind's default.

    Raises:
        StageError: a loss name that is not in :data:`llm2clip.losses.LOSSES`.
    """
    from llm2clip.losses import LOSSES

    name = tower_kind(cfg.tower).default_loss if cfg.loss == "auto" else cfg.loss
    if name not in LOSSES:
        raise StageError(f"train_vision.loss: must be auto or one of {sorted(LOSSES)}, got {cfg.loss!r}")
    return name


def build_model(cfg: TrainVisionConfig, inputs: Inputs) -> LLM2CLIPModel:
    """The model to train: ``init_model`` when set (:func:`load_init_model`), else the tower from the
    config, a fresh head and adapter, and the loss's temperature (and bias) unless the config or the
    pretrained checkpoint gives one."""
    from llm2clip.losses import LOSSES

    if cfg.init_model:
        return load_init_model(cfg, inputs)

    loss = LOSSES[loss_name(cfg)]
    scale = cfg.logit_scale_init
    if scale is None and cfg.tower_path:
        scale = read_pretrained_logit_scale(cfg.tower_path)  # reference keeps the CLIP's (ln 100)
    return LLM2CLIPModel.build(
        TowerSpec.from_dict(cfg.tower_spec()), llm_dim=inputs.llm_dim, embed_dim=cfg.embed_dim,
        adapter_blocks=cfg.adapter_blocks, adapter_expansion=cfg.adapter_expansion,
        logit_scale_init=loss.init_logit_scale if scale is None else scale,
        logit_bias_init=loss.init_logit_bias if loss.needs_bias else None, loss=loss_name(cfg),
        caption_encoder=inputs.encoder.get("path"),
        caption_encoder_fingerprint=inputs.encoder.get("fingerprint"))


def load_init_model(cfg: TrainVisionConfig, inputs: Inputs) -> LLM2CLIPModel:
    """``train_vision.init_model``: an exported model to fine-tune, checked against this run.

    Raises:
        StageError: not an exported model, embeddings of another width, or a ``loss`` other than
            ``auto`` / the model's own.
    """
    try:
        model = LLM2CLIPModel.from_pretrained(cfg.init_model)
    except (OSError, ValueError) as err:
        raise StageError(f"train_vision.init_model: {err}") from err
    if model.llm_dim != inputs.llm_dim:
        raise StageError(f"train_vision.init_model: {cfg.init_model} takes {model.llm_dim}-d caption embeddings, "
                         f"{inputs.embeddings} holds {inputs.llm_dim}-d ones (embed with its caption encoder)")
    if cfg.loss not in ("auto", model.loss):
        raise StageError(f"train_vision.loss: {cfg.init_model} was trained with {model.loss!r}; "
                         f"use auto or {model.loss!r}, got {cfg.loss!r}")
    model.caption_encoder = inputs.encoder.get("path")
    model.caption_encoder_fingerprint = inputs.encoder.get("fingerprint")
    model.tower.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return model.train()


def validate(model: LLM2CLIPModel, inputs: Inputs, cfg: TrainVisionConfig, endpoint: str) -> dict[str, dict]:
    """open_clip 1:1 retrieval metrics on the val split, per caption field (first caption each)."""
    from llm2clip.train.vision_trainer import retrieval_embeddings

    if not inputs.val_samples:
        log.warning("train_vision: %s has no val split; no val retrieval metrics", inputs.data)
        return {}
    batches = vision_data.iter_val_batches(
        inputs.data, inputs.embeddings, model.eval_transform(), inputs.fields, batch_size=cfg.val_batch_size,
        max_samples=cfg.val_max_samples, endpoint_url=endpoint)
    images, texts = retrieval_embeddings(model, batches)
    scale = math.exp(float(model.logit_scale.detach().reshape(-1)[0]))
    return {name: clip_metrics(images, text, logit_scale=scale) | {"pairs": len(images)}
            for name, text in texts.items()}


def save_training_curve(history: dict[str, list[float]], path: Path, resumed_from: int = 0) -> None:
    """Loss, in-batch accuracy, LR and logit scale per step (a dotted line where a run resumed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history["loss"]) + 1)
    panels = [("loss", ["loss"]), ("in-batch top-1", ["i2t_acc", "t2i_acc"]), ("lr (max group)", ["lr"]),
              ("logit scale", ["logit_scale"])]
    fig, axes = plt.subplots(2, 2, figsize=(8, 5), dpi=100, sharex=True)
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            ax.plot(steps, history[key], lw=1, label=key)
        if resumed_from:
            ax.axvline(resumed_from, ls=":", c="grey")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("train_vision")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(outcome, val: dict[str, dict], wall_time_s: float) -> dict[str, Any]:
    """``metrics.json``: final train stats, val R@1 per field and their mean over fields."""
    h = outcome.history
    metrics: dict[str, Any] = {
        "steps": outcome.steps, "samples_seen": outcome.samples_seen, "resumed_from": outcome.resumed_from,
        "final_loss": h["loss"][-1], "first_loss": h["loss"][0], "final_logit_scale": h["logit_scale"][-1],
        "final_scale": math.exp(h["logit_scale"][-1]), "final_i2t_acc": h["i2t_acc"][-1],
        "final_t2i_acc": h["t2i_acc"][-1], "mean_samples_per_second": outcome.samples_per_second,
        "wall_time_s": wall_time_s,
    }
    for direction in ("image_to_text", "text_to_image"):
        values = [m[f"{direction}_R_at_1"] for m in val.values()]
        metrics[f"val_{direction}_R_at_1"] = sum(values) / len(values) if values else float("nan")
    for name, m in val.items():
        metrics.update({f"val_{name}_{k}": v for k, v in m.items()})
    return metrics


def write_outputs(out: Path, model: LLM2CLIPModel, outcome, val: dict[str, dict], plan, inputs: Inputs,
                  cfg: TrainVisionConfig, common: CommonConfig, world_size: int, wall_time_s: float,
                  checkpoint_tag: str | None = None) -> dict:
    """Model, ``training_curve.png``, ``metrics.json``, then ``manifest.json`` (the commit mark)."""
    model.save_pretrained(out)
    save_training_curve(outcome.history, out / "training_curve.png", outcome.resumed_from)
    metrics = summarize(outcome, val, wall_time_s)
    atomic_write_json(out / "metrics.json", metrics)
    files = {name: sha256_file(out / name) for name in
             ("model.safetensors", CONFIG_FILE, "training_curve.png", "metrics.json")}
    write_manifest(STAGE, out, {
        "config_hash": config_hash(common, cfg),
        "model": {"config": CONFIG_FILE, "weights": "model.safetensors", "embed_dim": model.embed_dim,
                  "llm_embedding_dim": model.llm_dim, "tower": model.tower.spec.kind},
        "training": {"steps": outcome.steps, "samples_seen": outcome.samples_seen,
                     "resumed_from": outcome.resumed_from, "world_size": world_size,
                     "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
                     "precision": plan.precision, "zero_stage": cfg.zero_stage,
                     "zero_stage_run": effective_zero_stage(cfg, world_size, plan.precision),
                     "checkpoint": checkpoint_tag, "losses": outcome.history["loss"]},
        "inputs": {"data": {"path": inputs.data, "manifest_sha256": inputs.data_sha256,
                            "train_samples": inputs.train_samples, "val_samples": inputs.val_samples},
                   "embeddings": {"path": inputs.embeddings, "manifest_sha256": inputs.embeddings_sha256,
                                  "encoder_fingerprint": inputs.encoder.get("fingerprint"),
                                  "dim": inputs.llm_dim,
                                  "caption_mix": dict(zip(inputs.fields, inputs.weights, strict=True))}},
        "val_protocol": "1:1 pairs, first caption of each field (open_clip get_clip_metrics)",
        "files": files,
    })
    return metrics


def log_summary(metrics: dict[str, Any], where: str) -> None:
    log.info("train_vision: %d steps (%d resumed), %d samples, %.1f samples/s; loss %.4f -> %.4f, "
             "scale %.1f; val R@1 i2t %.3f t2i %.3f; model in %s", metrics["steps"], metrics["resumed_from"],
             metrics["samples_seen"], metrics["mean_samples_per_second"], metrics["first_loss"],
             metrics["final_loss"], metrics["final_scale"], metrics["val_image_to_text_R_at_1"],
             metrics["val_text_to_image_R_at_1"], where)

