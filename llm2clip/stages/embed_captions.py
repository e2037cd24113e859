"""embed_captions: every caption of every image shard -> key-aligned embedding sidecars.

Reads ``data`` (prepare_data) and ``caption_encoder`` (caption_contrastive, or any dir
``CaptionEncoder.from_pretrained`` loads); writes into ``embeddings``: one
``X_text_embeddings.tar`` per image shard ``X.tar`` (train and val), ``zeroshot/<split>.npy``
class-prompt embeddings and, last, ``manifest.json``. The layout is in
:mod:`llm2clip.data.sidecars`, the batching in :mod:`llm2clip.text.embed`. A rerun keeps the
sidecars whose done-marker still verifies and redoes the rest (a killed run resumes).

Across pods (a KFP fan-out, :mod:`llm2clip.data.parts`): :func:`run_part` embeds one share of
the image shards into a part folder; ``run(..., parts=[folders])`` is the merge, which verifies
and copies them (no model is loaded). The output is the same as one process makes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, EmbedCaptionsConfig, config_hash
from llm2clip.contracts import write_manifest
from llm2clip.data import parts as fanout
from llm2clip.data import sidecars
from llm2clip.data.shards import load_manifest
from llm2clip.eval.zeroshot import DEFAULT_TEMPLATES, build_prompts
from llm2clip.io import StageError, atomic_path, dir_fingerprint, is_remote, output_dir, sha256_file
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


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What a run embeds with, checked: the data manifest, the encoder and the identity a finished
    sidecar must have been made with to be kept."""

    manifest: dict
    source: str
    fingerprint: str
    identity: dict
    tracked: dict  # inputs the MLflow run records


def _inputs(cfg: EmbedCaptionsConfig, common: CommonConfig, data: str, caption_encoder: str) -> _Inputs:
    manifest = load_manifest(data, common.s3_endpoint_url, common.caption_fields)
    source = resolve_model(caption_encoder, cfg.model_cache_dir)
    check_caption_encoder_dir(caption_encoder, source)
    fingerprint = embed.encoder_fingerprint(source)
    # what a finished sidecar must have been made with to be kept by a rerun (max_length None: the
    # encoder's own, which its fingerprint covers; markers written before the key existed read None)
    identity = {"format_version": sidecars.FORMAT_VERSION, "fingerprint": fingerprint, "dtype": cfg.dtype,
                "normalized": cfg.normalize, "caption_fields": list(common.caption_fields),
                "precision": _device(cfg)[1], "max_length": cfg.max_length or None}
    tracked = {"data": data} | ({"caption_encoder": source} if Path(source, "manifest.json").is_file() else {})
    return _Inputs(manifest, source, fingerprint, identity, tracked)


def _shard_entries(manifest: dict) -> list[tuple[str, dict]]:
    """``(split, entry)`` of every image shard, in the manifest's order (the job order)."""
    return [(split, e) for split, entries in manifest["shards"].items() for e in entries]


def _prompts(zs: list[tuple]) -> list[str]:
    return [p for _, names, tpl in zs for row in build_prompts(names, tpl) for p in row]


def _embed(jobs: list, prompts: list[str], cfg: EmbedCaptionsConfig, common: CommonConfig, inputs: _Inputs,
           out: Path, desc: str) -> tuple[list[dict], Any, float, int]:
    """Embed ``jobs`` (and ``prompts``) into ``out`` with a progress bar; ``(markers, prompt
    vectors, seconds, workers)``."""
    from tqdm.auto import tqdm

    workers, gpus = _workers(cfg, _device(cfg)[0])
    opts = _options(cfg, common, inputs.source, out, inputs.identity, workers)
    # captions per field are not known before reading; one per field is the estimate
    total = sum(j.count for j in jobs) * len(common.caption_fields) + len(prompts)
    started = time.monotonic()
    with tqdm(total=total, desc=desc, unit="caption", dynamic_ncols=True) as bar:
        made, prompt_vectors = embed.run_jobs(jobs, opts, num_workers=workers, texts=prompts,
                                              on_batch=lambda c, t: bar.update(c), gpus=gpus)
        bar.total = bar.n
    return made, prompt_vectors, time.monotonic() - started, workers


def run(cfg: EmbedCaptionsConfig, common: CommonConfig, *, data: str, caption_encoder: str,
        embeddings: str, pipeline_run_id: str = "", parts: Sequence[str] = ()) -> EmbedCaptionsResult:
    """Embed every caption of ``data`` with ``caption_encoder`` into sidecars in ``embeddings``.

    Args:
        parts: The merge of a fan-out: the folders :func:`run_part` wrote, one per part (local
            folders: a KFP task's downloaded inputs). Every sidecar and the zero-shot grids are
            then verified and copied from their part; nothing is embedded and no model is loaded.

    Raises:
        StageError: data not prepared / changed since its manifest, a caption_encoder that is
            another stage's output or lacks its settings file, vectors overflow ``dtype``, a
            worker dies, or a part that is missing, incomplete or made from other inputs.
    """
    endpoint = common.s3_endpoint_url
    inputs = _inputs(cfg, common, data, caption_encoder)
    manifest, identity = inputs.manifest, inputs.identity
    with stage_run(STAGE, cfg, common, inputs=inputs.tracked, pipeline_run_id=pipeline_run_id) as tracker:
        tracker.set_tags({"llm2clip.encoder_fingerprint": inputs.fingerprint})
        with output_dir(embeddings, endpoint) as out:
            sidecars.clean_output(out, {e["name"] for _, e in _shard_entries(manifest)})
            zs = _zeroshot_sets(cfg, data, manifest, endpoint)
            prompts = _prompts(zs)
            if parts:
                made, zeroshot, seconds, workers = _merge_parts(list(parts), out, cfg, common, data, inputs, zs)
                kept: list[dict] = []
            else:
                jobs, kept = embed.plan_jobs(out, data, manifest, identity)
                log.info("embed_captions: %d sidecars to make, %d kept from an earlier run", len(jobs), len(kept))
                made, prompt_vectors, seconds, workers = _embed(jobs, prompts, cfg, common, inputs, out, STAGE)
                zeroshot = _write_zeroshot(out, zs, prompt_vectors, cfg, identity)
            body = _manifest(cfg, common, data, inputs.source, identity, made + kept, zeroshot, endpoint)
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
        zeroshot_sets=tuple(zeroshot), fingerprint=inputs.fingerprint, captions_per_s=metrics["captions_per_s"],
    )


# ------------------------------------------------------------------- fan-out across pods


def _share(manifest: dict, prompts: list[str], fields: int, part: int, parts: int) -> tuple[set[str], bool]:
    """Group task ``part``'s shards (by name) and whether it embeds the zero-shot prompts:
    :func:`~llm2clip.text.embed.assign_work` over the pods, as it assigns a pod's workers."""
    entries = _shard_entries(manifest)
    indices, texts = embed.assign_work([e["count"] for _, e in entries], parts, len(prompts), fields)[part]
    return {entries[i][1]["name"] for i in indices}, texts


def _plan_digest(inputs: _Inputs, data: str, prompts: list[str], endpoint: str) -> str:
    """What a part's sidecars depend on: the identity, the data manifest, the prompts."""
    parts = [inputs.identity, dir_fingerprint(data, endpoint), prompts]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run_part(cfg: EmbedCaptionsConfig, common: CommonConfig, *, data: str, caption_encoder: str, part: int,
             parts: int, embeddings_part: str, pipeline_run_id: str = "") -> dict[str, Any]:
    """Group task ``part`` of ``parts``: embed its share of the image shards (and the zero-shot
    prompts, when they fall to it) into ``embeddings_part``, then write its ``part.json``. A
    rerun keeps the sidecars it finished. Nothing is tracked in MLflow: the merge's run is the
    stage's. Returns the part record.

    Raises:
        StageError: as :func:`run`; ValueError: a part outside ``0..parts-1``.
    """
    fanout.check_part(part, parts)
    endpoint = common.s3_endpoint_url
    inputs = _inputs(cfg, common, data, caption_encoder)
    zs = _zeroshot_sets(cfg, data, inputs.manifest, endpoint)
    prompts = _prompts(zs)
    mine, texts = _share(inputs.manifest, prompts, len(common.caption_fields), part, parts)
    with output_dir(embeddings_part, endpoint) as out:
        sidecars.clean_output(out, mine)
        shards = {split: [e for e in entries if e["name"] in mine]
                  for split, entries in inputs.manifest["shards"].items()}
        jobs, kept = embed.plan_jobs(out, data, {**inputs.manifest, "shards": shards}, inputs.identity)
        log.info("embed_captions: group part %d of %d: %d of %d image shards%s (%d kept from an earlier run)",
                 part, parts, len(mine), len(_shard_entries(inputs.manifest)),
                 " and the zero-shot prompts" if texts else "", len(kept))
        made, vectors, seconds, workers = _embed(jobs, prompts if texts else [], cfg, common, inputs, out,
                                                 f"embed_captions {part}/{parts}")
        zeroshot = _write_zeroshot(out, zs, vectors, cfg, inputs.identity) if texts else {}
        record = fanout.write_part(out, STAGE, part, parts, _plan_digest(inputs, data, prompts, endpoint),
                                   {"shards": sorted(mine), "zeroshot": zeroshot, "made": len(made),
                                    "kept": len(kept), "workers": workers, "seconds": seconds})
    log.info("embed_captions: group part %d of %d done: %d sidecars (%d made), %.1f s -> %s", part, parts,
             len(mine), len(made), seconds, embeddings_part)
    return record


def _merge_parts(folders: list[str], out: Path, cfg: EmbedCaptionsConfig, common: CommonConfig, data: str,
                 inputs: _Inputs, zs: list[tuple]) -> tuple[list[dict], dict, float, int]:
    """The merge: every part checked, every sidecar verified and copied into ``out`` in job order,
    the zero-shot grids from the part that made them. ``(markers, zeroshot entries, seconds of
    the slowest part, workers of all parts)``."""
    endpoint = common.s3_endpoint_url
    remote = [f for f in folders if is_remote(f)]
    if remote:
        raise StageError(f"embed_captions: the merge reads its parts from local folders, not {remote[0]}")
    prompts = _prompts(zs)
    checked = fanout.read_parts(folders, STAGE, _plan_digest(inputs, data, prompts, endpoint), endpoint)
    owner = {name: (part, Path(folder)) for part, (folder, record) in enumerate(checked) for name in record["shards"]}
    markers = []
    for _, entry in _shard_entries(inputs.manifest):
        part, folder = owner.get(entry["name"], (None, None))
        done = None if folder is None else sidecars.marker_matches(
            folder, entry["name"], {**inputs.identity, "image_sha256": entry["sha256"]})
        if done is None:
            raise StageError(f"embed_captions: the sidecar of {entry['name']} is not finished in group part "
                             f"{part} of {len(checked)}, or it changed since; re-run that group task "
                             f"(llm2clip embed_captions --part {part}/{len(checked)})")
        for name in (sidecars.sidecar_name(entry["name"]), sidecars.marker_name(entry["name"])):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(folder / name, tmp)
        markers.append(done)
    zeroshot: dict[str, Any] = {}
    for folder, record in checked:
        for split, entry in record["zeroshot"].items():
            for key in ("file", "meta"):
                with atomic_path(out / entry[key]) as tmp:
                    shutil.copyfile(Path(folder) / entry[key], tmp)
            if sha256_file(out / entry["file"]) != entry["sha256"]:
                raise StageError(f"embed_captions: {folder}/{entry['file']} changed since its group task wrote it; "
                                 "re-run that group task")
            zeroshot[split] = entry
    if sorted(zeroshot) != sorted(split for split, _, _ in zs):
        raise StageError(f"embed_captions: the parts hold zero-shot grids for {sorted(zeroshot)}, this merge needs "
                         f"{sorted(split for split, _, _ in zs)}; re-run the group tasks")
    log.info("embed_captions: merged %d group parts: %d sidecars, zero-shot sets %s", len(checked), len(markers),
             sorted(zeroshot) or "none")
    return (markers, zeroshot, max(r["seconds"] for _, r in checked), sum(r["workers"] for _, r in checked))
