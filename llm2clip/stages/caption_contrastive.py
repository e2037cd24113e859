"""caption_contrastive: tune a decoder LLM into a caption encoder; CRA before and after.

Runs on every rank under ``torchrun --nproc-per-node N -m llm2clip caption_contrastive ...``
and as a plain single process. Only rank 0 writes the output and logs to MLflow. A killed run
started again with the same config resumes from its last checkpoint (``<output>.ckpt``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time

import torch

from llm2clip.config import CaptionContrastiveConfig, CommonConfig, config_hash
from llm2clip.io import StageError, atomic_write_json, dir_fingerprint, output_dir
from llm2clip.text import contrastive
from llm2clip.text.adapters import check_adapter_dirs, merge_adapters
from llm2clip.text.artifacts import probe_embeddings, write_encoder_dir
from llm2clip.text.cra import caption_retrieval_accuracy
from llm2clip.text.data import read_splits
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.text.loading import load_model, load_tokenizer, resolve_model
from llm2clip.text.pairs import load_text_pairs
from llm2clip.text.truncation import TruncationCount
from llm2clip.tracking import Tracker
from llm2clip.train import checkpoint
from llm2clip.train.distributed import DistContext, run_on_every_rank
from llm2clip.train.precision import resolve_precision

log = logging.getLogger(__name__)
STAGE = "caption_contrastive"
CRA_BEFORE = "cra_before.json"
MNTP_LOSSES = "mntp_losses.json"
MNTP_TRUNCATION = "mntp_truncation.json"


@dataclasses.dataclass(frozen=True)
class CaptionContrastiveResult:
    """What the stage produced (the same on every rank)."""

    output: str
    cra_before: float
    cra_after: float
    steps: int
    resumed_from: int
    train_images: int
    cra_pairs: int
    wall_time_s: float

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def run(cfg: CaptionContrastiveConfig, common: CommonConfig, *, data: str, caption_encoder: str,
        pipeline_run_id: str = "") -> CaptionContrastiveResult:
    """Tune ``cfg.model`` on the captions in ``data``; write the encoder to ``caption_encoder``."""
    started = time.monotonic()
    return run_on_every_rank(STAGE, cfg, common, inputs={"data": data}, pipeline_run_id=pipeline_run_id,
                             body=lambda ctx, tracker: _run(cfg, common, ctx, tracker, data, caption_encoder,
                                                            started))


def _backbone(cfg, source: str, store: checkpoint.CheckpointStore, texts: list[str], seed: int, precision: str,
              ctx: DistContext):
    """The model to tune: the base model (with ``init_adapters`` merged), or (mntp_steps > 0) that
    model after MNTP."""
    ckpt_dir = store.local
    mntp_dir = ckpt_dir / "mntp"
    if cfg.mntp_steps and not (mntp_dir / "config.json").is_file():
        from llm2clip.text.mntp import train_mntp

        lm = load_model(source, causal_lm=True, attn_implementation=cfg.attn_implementation)
        lm = merge_adapters(lm, cfg.init_adapters, f"{STAGE}.init_adapters")
        cut = TruncationCount()
        merged, losses = train_mntp(lm, load_tokenizer(source), texts, cfg, seed=seed, precision=precision,
                                    ctx=ctx, truncation=cut)
        backbone = merged.base_model
        if ctx.is_main:  # kept, so a resumed run does not redo MNTP
            backbone.save_pretrained(ckpt_dir / "tmp-mntp")
            atomic_write_json(ckpt_dir / "tmp-mntp" / MNTP_LOSSES, losses)
            atomic_write_json(ckpt_dir / "tmp-mntp" / MNTP_TRUNCATION, cut.to_dict(cfg.max_length))
            (ckpt_dir / "tmp-mntp").rename(mntp_dir)
            store.push("mntp")
        ctx.barrier()
        return backbone
    if cfg.mntp_steps:
        return load_model(str(mntp_dir), attn_implementation=cfg.attn_implementation)
    model = load_model(source, attn_implementation=cfg.attn_implementation)
    return merge_adapters(model, cfg.init_adapters, f"{STAGE}.init_adapters")


def _mntp_output(store: checkpoint.CheckpointStore, name: str, empty):
    """A file kept beside the MNTP weights (loss per step, truncation), or ``empty`` when MNTP is off."""
    path = store.local / "mntp" / name
    return json.loads(path.read_text()) if path.is_file() else empty


def _cra(encoder, images, common, cfg, store: checkpoint.CheckpointStore | None = None) -> dict[str, float]:
    cache = store.local / CRA_BEFORE if store is not None else None
    if cache is not None and cache.is_file():  # a resumed run measured "before" already
        return json.loads(cache.read_text())
    result = caption_retrieval_accuracy(encoder, images, common.caption_fields, progress=True,
                                        batch_size=cfg.encode_batch_size, max_images=cfg.cra_max_images)
    if store is not None:
        atomic_write_json(cache, result)
        store.push(CRA_BEFORE)
    return result


def _text_pairs(cfg, common):
    """The text pairs to mix in and one summary per file (none when ``text_pair_ratio`` is 0)."""
    if not cfg.text_pair_ratio:
        return [], []
    try:
        return load_text_pairs(cfg.text_pairs, cfg.instruction, common.s3_endpoint_url)
    except (OSError, ValueError) as err:
        raise StageError(f"{STAGE}.text_pairs: {err}") from err


def _warn_truncation(cfg, counts: dict[str, TruncationCount]) -> None:
    """One warning line when any caption was cut at ``max_length``."""
    cut = [count.describe(what, cfg.max_length) for what, count in counts.items() if count.truncated]
    if cut:
        log.warning("%s: %s; caption_contrastive.max_length sets the budget", STAGE, "; ".join(cut))


def _run(cfg, common, ctx: DistContext, tracker: Tracker, data: str, output: str, started: float):
    seed = common.seed + cfg.seed_offset
    try:
        precision = resolve_precision(cfg.precision, ctx.device)
    except ValueError as err:
        raise StageError(f"{STAGE}.precision: {err}") from err
    adapters = check_adapter_dirs(cfg.init_adapters, f"{STAGE}.init_adapters")  # fail before any loading
    text_pairs, text_sources = _text_pairs(cfg, common)
    splits = read_splits(data, caption_fields=common.caption_fields, endpoint_url=common.s3_endpoint_url)
    train_images, val_images = splits["train"], splits["val"]
    if not val_images:
        raise StageError(f"{data} has no val split: CRA needs held-out captions")
    # rank 0 converts a GGUF once; the other ranks wait and then read its cache
    if not ctx.is_main:
        ctx.barrier()
    source = resolve_model(cfg.model, cfg.model_cache_dir)
    if ctx.is_main:
        ctx.barrier()
    data_sha = dir_fingerprint(data, common.s3_endpoint_url)
    identity = {"config": config_hash(cfg), "seed": seed, "caption_fields": list(common.caption_fields),
                "world_size": ctx.world_size, "data": data_sha}
    if adapters or text_sources:  # what the config's paths held: a changed file is a fresh start
        identity.update(init_adapters=[a["sha256"] for a in adapters], text_pairs=text_sources)
    # next to the output (a sibling S3 prefix for an s3:// output), so a lost pod or node resumes
    store = checkpoint.CheckpointStore.at(cfg.checkpoint_dir or f"{output.rstrip('/')}.ckpt", common.s3_endpoint_url)
    checkpoint.prepare_dir(store, identity, ctx)

    settings = EncoderSettings(
        pooling=cfg.pooling, bidirectional=cfg.bidirectional, prompt_template=cfg.prompt_template,
        query_instruction=cfg.instruction, max_length=cfg.max_length, padding_side=cfg.padding_side,
        attn_implementation=cfg.attn_implementation, base_model=cfg.model,
    )
    torch.manual_seed(seed)
    texts = [c for image in train_images for _, c in image.flat(common.caption_fields)]
    backbone = _backbone(cfg, source, store, texts, seed, precision, ctx).to(ctx.device)
    encoder = CaptionEncoder(backbone, load_tokenizer(source), settings)
    before = _cra(encoder, val_images, common, cfg, store) if ctx.is_main else {}
    ctx.barrier()
    tracker.log_metrics({"cra_before": before.get("cra", 0.0)})

    encoder.model = contrastive.add_lora(encoder.model, cfg, cfg.gradient_checkpointing)
    try:
        outcome = contrastive.train(encoder, train_images, cfg, caption_fields=common.caption_fields,
                                    seed=seed, precision=precision, ckpt_dir=store, ctx=ctx,
                                    on_log=lambda step, metrics: tracker.log_metrics(metrics, step),
                                    text_pairs=text_pairs)
    except ValueError as err:
        raise StageError(str(err)) from err
    result = None
    if ctx.is_main:
        with encoder.count_truncation() as cra_cut:  # the val captions; "before" cut the same ones
            after = _cra(encoder, val_images, common, cfg)
        mntp_cut = TruncationCount.from_dict(_mntp_output(store, MNTP_TRUNCATION, {}))
        _warn_truncation(cfg, {"training": outcome.truncation, "MNTP": mntp_cut, "CRA": cra_cut})
        result = CaptionContrastiveResult(output, before["cra"], after["cra"], outcome.steps,
                                          outcome.resumed_from, len(train_images), int(after["pairs"]),
                                          time.monotonic() - started)
        metrics = {"cra_before": before["cra"], "cra_after": after["cra"],
                   "cra_gain": after["cra"] - before["cra"], "final_loss": outcome.losses[-1],
                   "steps": outcome.steps, "wall_time_s": result.wall_time_s,
                   **outcome.truncation.metrics(), **cra_cut.metrics("cra_"),
                   **(mntp_cut.metrics("mntp_") if cfg.mntp_steps else {})}
        manifest = {
            "stage": STAGE, "config_hash": config_hash(common, cfg), "base_model": cfg.model,
            "resolved_model": source, "cra_before": before, "cra_after": after,
            "data": {"manifest_sha256": data_sha, "train_images": len(train_images),
                     "val_images": len(val_images), "cra_pairs": result.cra_pairs,
                     "cra_truncation": cra_cut.to_dict(cfg.max_length),
                     "text_pairs": {"ratio": cfg.text_pair_ratio, "pairs": len(text_pairs),
                                    "sources": text_sources}},
            "training": {"steps": outcome.steps, "resumed_from": outcome.resumed_from,
                         "world_size": ctx.world_size, "global_batch": cfg.batch_size * ctx.world_size,
                         "text_pairs_per_step": outcome.text_pairs_per_step, "init_adapters": adapters,
                         "mntp_steps": cfg.mntp_steps, "loop_wall_time_s": outcome.wall_time_s,
                         "losses": outcome.losses, "mntp_losses": _mntp_output(store, MNTP_LOSSES, []),
                         "truncation": outcome.truncation.to_dict(cfg.max_length),
                         "mntp_truncation": mntp_cut.to_dict(cfg.max_length),
                         "precision": precision},
            "wall_time_s": result.wall_time_s,
            "probe": probe_embeddings(encoder, val_images, common.caption_fields),
        }
        with output_dir(output, common.s3_endpoint_url) as out:
            write_encoder_dir(out, encoder, outcome.losses, outcome.resumed_from, metrics, manifest)
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "steps"}, step=outcome.steps)
            for name in ("training_curve.png", "metrics.json", SETTINGS_FILE, "manifest.json"):
                tracker.log_artifact(out / name)
        if not cfg.keep_checkpoints:
            store.remove()
    ctx.barrier()
    if store.remote and ctx.local_rank == 0:
        shutil.rmtree(store.local, ignore_errors=True)  # the node's staging copy
    return result
