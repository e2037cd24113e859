"""embed_captions: every caption of every image shard -> key-aligned embedding sidecars.

Reads ``data`` (prepare_data) and ``caption_encoder`` (caption_contrastive, or any dir
``CaptionEncoder.from_pretrained`` loads); writes into ``embeddings``: one
``X_text_embeddings.tar`` per image shard ``X.tar`` (train and val), ``zeroshot/<split>.npy``
class-prompt embeddings and, last, ``manifest.json``. The layout is in
:mod:`llm2clip.data.sidecars`, the batching in :mod:`llm2clip.text.embed`. A rerun keeps the
sidecars whose done-marker still verifies and redoes the rest (a killed run resumes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, EmbedCaptionsConfig, config_hash
from llm2clip.contracts import write_manifest
from llm2clip.data import sidecars
from llm2clip.data.shards import load_manifest
from llm2clip.eval.zeroshot import DEFAULT_TEMPLATES, build_prompts
from llm2clip.io import StageError, dir_fingerprint, output_dir
from llm2clip.lineage import check_caption_encoder_dir
from llm2clip.text import embed
from llm2clip.text.loading import resolve_model
from llm2clip.text.truncation import TruncationCount
from llm2clip.tracking import stage_run

log = logging.getLogger(__name__)
STAGE = "embed_captions"


@dataclasses.dataclass(frozen=True)
class EmbedCaptionsResult:
    """What embed_captions made (``summary()`` is what the CLI prints)."""

    embeddings: str
    sidecars: int
    reused: int
    samples: int
    captions: int
    dim: int
    zeroshot_sets: tuple[str, ...]
    fingerprint: str
    captions_per_s: float

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _device(cfg: EmbedCaptionsConfig) -> tuple[str, str]:
    """``(device, precision)`` with ``auto`` resolved: CUDA when there is a GPU, and the precision
    of :func:`llm2clip.train.precision.resolve_precision` (bf16 where the GPU has it).

    Raises:
        StageError: a precision the device has not (bf16 on an old GPU, fp16 on CPU).
    """
    import torch

    from llm2clip.train.precision import resolve_precision

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return device, resolve_precision(cfg.precision, torch.device(device))
    except ValueError as err:
        raise StageError(f"embed_captions.precision: {err}") from err


def _workers(cfg: EmbedCaptionsConfig, device: str) -> tuple[int, int]:
    """``(worker processes, visible GPUs)``: ``num_workers``, or for 0 (auto) one per GPU this
    process sees (``CUDA_VISIBLE_DEVICES`` honoured) on CUDA and one on CPU."""
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    workers = embed.resolve_workers(cfg.num_workers, device, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpus and workers > gpus:
        log.warning("embed_captions: %d workers on %d GPUs (embed_captions.num_workers asks for it): "
                    "GPUs run %d workers each, round robin", workers, gpus, -(-workers // gpus))
    return workers, gpus


def _options(cfg: EmbedCaptionsConfig, common: CommonConfig, source: str, out: Path, identity: dict,
             workers: int):
    device, precision = _device(cfg)
    cores = len(os.sched_getaffinity(0))
    return embed.EmbedOptions(
        encoder=source, out=str(out), caption_fields=common.caption_fields, identity=identity,
        dtype=cfg.dtype, normalize=cfg.normalize,
        max_tokens=cfg.max_tokens or (16384 if device == "cuda" else 1024),
        max_batch_size=cfg.max_batch_size, device=device, precision=precision,
        threads=cfg.threads or max(1, cores // workers), endpoint_url=common.s3_endpoint_url,
        max_length=cfg.max_length,
    )


def _zeroshot_sets(cfg: EmbedCaptionsConfig, data: str, manifest: dict, endpoint: str) -> list[tuple]:
    templates = list(cfg.zeroshot_templates or DEFAULT_TEMPLATES)
    sets = [(s, sidecars.zeroshot_classes(data, s, manifest, endpoint)) for s in cfg.zeroshot_splits]
    for split, names in sets:
        if not names:
            log.info("embed_captions: no labels in %s/%s, no zero-shot set for it", data, split)
    return [(split, names, templates) for split, names in sets if names]


def _write_zeroshot(out: Path, sets: list[tuple], vectors, cfg: EmbedCaptionsConfig, identity: dict) -> dict:
    written, start = {}, 0
    for split, names, templates in sets:
        n = len(names) * len(templates)
        grid = vectors[start : start + n].reshape(len(names), len(templates), -1)  # (C, T, D)
        grid = grid.astype(cfg.dtype)
        start += n
        meta = {"split": split, "dtype": cfg.dtype, "normalized": cfg.normalize,
                "fingerprint": identity["fingerprint"]}
        written[split] = sidecars.write_zeroshot(out, split, names, templates, grid, meta)
    return written


def _settings(cfg: EmbedCaptionsConfig, source: str):
    """The encoder's settings as this run embeds with them (``max_length`` overridden if set)."""
    settings = embed.encoder_settings(source)
    return dataclasses.replace(settings, max_length=cfg.max_length) if cfg.max_length else settings


def _stats(markers: list[dict]) -> embed.EmbedStats:
    stats = embed.EmbedStats()
    for m in markers:
        stats.add(embed.EmbedStats(**m["stats"]))
    return stats


def _manifest(cfg, common, data, source, identity, markers, zeroshot, endpoint) -> dict:
    settings = _settings(cfg, source)
    stats = _stats(markers)
    return sidecars.build_manifest(
        identity, markers, zeroshot, config_hash=config_hash(common, cfg),
        encoder={"path": source, "settings": settings.to_dict()},
        data={"path": data, "manifest_sha256": dir_fingerprint(data, endpoint)},
        stats={"captions": stats.captions, "unique_captions": stats.unique, "tokens": stats.tokens,
               "truncation": stats.truncation().to_dict(settings.max_length)},
    )


def _metrics(made: list[dict], kept: list[dict], seconds: float, prompts: int) -> dict[str, float]:
    stats = _stats(made)
    captions = stats.captions + prompts
    return {"captions": captions, "unique_captions": stats.unique, "tokens": stats.tokens,
            "padding_fraction": 1 - stats.tokens / max(1, stats.padded_tokens),
            "captions_per_s": captions / max(seconds, 1e-9),
            "tokens_per_s": stats.tokens / max(seconds, 1e-9),
            "sidecars_made": len(made), "sidecars_kept": len(kept), "embed_seconds": seconds,
            **_stats(made + kept).truncation().metrics()}  # truncation: of the whole output


def _log_summary(m: dict, metrics: dict, where: str) -> None:
    c = m["counts"]
    sets = ", ".join(f"{k} ({v['classes']} classes x {v['templates']} templates)"
                     for k, v in m["zeroshot"].items())
    log.info("embed_captions: %d samples, %d captions in %d sidecars (%d made, %d kept) at %s; dim %s %s%s; "
             "%.0f captions/s, padding %.1f%%; zero-shot sets: %s; encoder %s",
             c["samples"], c["captions"], c["shards"], metrics["sidecars_made"], metrics["sidecars_kept"],
             where, m["dim"], m["dtype"], ", L2-normalised" if m["normalized"] else ", raw",
             metrics["captions_per_s"], 100 * metrics["padding_fraction"],
             sets or "none", m["encoder"]["fingerprint"][:16])


def run(cfg: EmbedCaptionsConfig, common: CommonConfig, *, data: str, caption_encoder: str,
        embeddings: str, pipeline_run_id: str = "") -> EmbedCaptionsResult:
    """Embed every caption of ``data`` with ``caption_encoder`` into sidecars in ``embeddings``.

    Raises:
        StageError: data not prepared / changed since its manifest, a caption_encoder that is
            another stage's output or lacks its settings file, vectors overflow ``dtype``, or a
            worker dies.
    """
    from tqdm.auto import tqdm

    endpoint = common.s3_endpoint_url
    manifest = load_manifest(data, endpoint, common.caption_fields)
    source = resolve_model(caption_encoder, cfg.model_cache_dir)
    check_caption_encoder_dir(caption_encoder, source)
    fingerprint = embed.encoder_fingerprint(source)
    # what a finished sidecar must have been made with to be kept by a rerun (max_length None: the
    # encoder's own, which its fingerprint covers; markers written before the key existed read None)
    identity = {"format_version": sidecars.FORMAT_VERSION, "fingerprint": fingerprint, "dtype": cfg.dtype,
                "normalized": cfg.normalize, "caption_fields": list(common.caption_fields),
                "precision": _device(cfg)[1], "max_length": cfg.max_length or None}
    inputs = {"data": data} | ({"caption_encoder": source} if Path(source, "manifest.json").is_file() else {})
    with stage_run(STAGE, cfg, common, inputs=inputs, pipeline_run_id=pipeline_run_id) as tracker:
        tracker.set_tags({"llm2clip.encoder_fingerprint": fingerprint})
        with output_dir(embeddings, endpoint) as out:
            sidecars.clean_output(out, {s["name"] for shards in manifest["shards"].values() for s in shards})
            workers, gpus = _workers(cfg, _device(cfg)[0])
            opts = _options(cfg, common, source, out, identity, workers)
            jobs, kept = embed.plan_jobs(out, data, manifest, identity)
            zs = _zeroshot_sets(cfg, data, manifest, endpoint)
            prompts = [p for _, names, tpl in zs for row in build_prompts(names, tpl) for p in row]
            # captions per field are not known before reading; one per field is the estimate
            total = sum(j.count for j in jobs) * len(common.caption_fields) + len(prompts)
            log.info("embed_captions: %d sidecars to make, %d kept from an earlier run", len(jobs), len(kept))
            started = time.monotonic()
            with tqdm(total=total, desc="embed_captions", unit="caption", dynamic_ncols=True) as bar:
                made, prompt_vectors = embed.run_jobs(jobs, opts, num_workers=workers, texts=prompts,
                                                      on_batch=lambda c, t: bar.update(c), gpus=gpus)
                bar.total = bar.n
            seconds = time.monotonic() - started
            zeroshot = _write_zeroshot(out, zs, prompt_vectors, cfg, identity)
            body = _manifest(cfg, common, data, source, identity, made + kept, zeroshot, endpoint)
            if manifest.get("eval_set"):  # an evaluation set: evaluate finds its embeddings by name
                body["eval_set"] = manifest["eval_set"]
            body = write_manifest(STAGE, out, body)  # last: the commit mark
            tracker.log_artifact(out / "manifest.json")
        metrics = {**_metrics(made, kept, seconds, len(prompts)), "workers": workers}
        tracker.log_metrics(metrics)
    _log_summary(body, metrics, str(embeddings))
    truncation = body["stats"]["truncation"]
    if truncation["truncated_captions"]:
        log.warning("%s; embed_captions.max_length sets the budget",
                    TruncationCount.from_dict(truncation).describe("embed_captions", truncation["max_length"]))
    return EmbedCaptionsResult(
        embeddings=str(embeddings), sidecars=len(made) + len(kept), reused=len(kept),
        samples=body["counts"]["samples"], captions=body["counts"]["captions"], dim=body["dim"],
        zeroshot_sets=tuple(zeroshot), fingerprint=fingerprint, captions_per_s=metrics["captions_per_s"],
    )
