"""Fast batched caption embedding for embed_captions (and anything that embeds many captions).

Why it is faster than ``CaptionEncoder.encode`` with a fixed batch size:

- **token-budget batches**: captions are tokenized once per chunk, sorted by token length and
  packed until ``captions x longest`` reaches ``max_tokens``, so short captions go in big
  batches, long ones in small batches, and almost no compute is spent on padding;
- **padding trimmed per batch**: a batch only keeps the columns its longest caption needs;
- **inference_mode**, no graph, and duplicate captions embedded once;
- **packed tokens** for Llama-family encoders (:mod:`llm2clip.text.packed`): no GEMM computes a
  padded position, q/k/v and gate/up run as one GEMM each, residual adds run inside the GEMMs;
- **per-shard work in processes**: :func:`run_jobs` spreads image shards over ``num_workers``
  spawned processes, each with ``cores // num_workers`` torch threads (or its own GPU).

Vectors do not depend on how captions are batched: positions count from each caption's first
real token and padded keys are masked (see :mod:`llm2clip.text.encoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm2clip.data import sidecars
from llm2clip.io import StageError, sha256_file
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.text.truncation import TruncationCount
from llm2clip.train.precision import torch_dtype

log = logging.getLogger(__name__)

MAX_PADDING = 0.02  # most padding a batch may carry (share of its tokens)
MIN_FILL = 0.5  # ... once it is at least this full (share of max_tokens)
CHUNK = 4096  # captions tokenized at once: bounds the (chunk, longest) int tensors in memory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", SETTINGS_FILE)
OnBatch = Callable[[int, int], None]  # (captions, real tokens) of one finished batch


def encoder_fingerprint(resolved: str | os.PathLike) -> str:
    """sha256 over the encoder's weights, config, tokenizer files and effective settings.

    Args:
        resolved: A local model dir (``llm2clip.text.loading.resolve_model`` output).

    Returns:
        64 hex digits; equal for byte-identical encoders that embed the same way.
    """
    path = Path(resolved)
    if not path.is_dir():
        raise StageError(f"caption_encoder {resolved} is not a local directory; cannot fingerprint it")
    digest = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES):
            digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    digest.update(json.dumps(encoder_settings(path).to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


def encoder_settings(resolved: str | os.PathLike) -> EncoderSettings:
    """The settings an encoder dir embeds with: its settings file, else the defaults.

    ``max_length`` is the effective one (the model's own limit when the settings leave it open),
    so the fingerprint and the manifest say how many tokens a caption really gets.
    """
    saved = Path(resolved) / SETTINGS_FILE
    settings = EncoderSettings.from_dict(json.loads(saved.read_text())) if saved.is_file() else EncoderSettings()
    return settings.with_model_limit(resolved)


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int,
                 max_padding: float = MAX_PADDING, min_fill: float = MIN_FILL) -> list[list[int]]:
    """Split captions into length-sorted batches under a token budget.

    Args:
        lengths: Token count of each caption.
        max_tokens: Budget of one batch, padding included (``len(batch) * longest``); a caption
            longer than the budget gets a batch of its own.
        max_batch_size: Most captions per batch.
        max_padding: A batch is closed early rather than let padding pass this share of its
            tokens (matters for small or very mixed sets; at scale sorted neighbours have
            nearly equal lengths anyway) ...
        min_fill: ... but only once it holds ``min_fill * max_tokens`` tokens: small GEMMs
            waste more than a little padding does.

    Returns:
        Batches of indices into ``lengths``, longest captions first (the biggest activation
        footprint runs first, so an out-of-memory shows at once, not at the end).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            # sorted descending: the first caption of a batch is its longest
            padded = (len(current) + 1) * lengths[current[0]]
            wasteful = padded - real - lengths[i] > max_padding * padded
            if (padded > max_tokens or len(current) >= max_batch_size
                    or (wasteful and len(current) * lengths[current[0]] >= min_fill * max_tokens)):
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


@dataclass
class EmbedStats:
    """Counters of one embedding run (real tokens exclude padding; truncation counts distinct
    captions: ``truncated`` of ``unique`` were cut at ``max_length``, losing ``truncated_tokens``
    tokens in all and at most ``truncated_tokens_max`` from one caption)."""

    captions: int = 0
    unique: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    truncated: int = 0
    truncated_tokens: int = 0
    truncated_tokens_max: int = 0

    def add(self, other: EmbedStats) -> None:
        for f in dataclasses.fields(self):
            combine = max if f.name == "truncated_tokens_max" else (lambda a, b: a + b)
            setattr(self, f.name, combine(getattr(self, f.name), getattr(other, f.name)))

    def truncation(self) -> TruncationCount:
        """The truncation counters as a :class:`~llm2clip.text.truncation.TruncationCount`."""
        return TruncationCount(self.unique, self.truncated, self.truncated_tokens, self.truncated_tokens_max)


@torch.inference_mode()
def embed_texts(encoder: CaptionEncoder, texts: Sequence[str], *, max_tokens: int = 1024,
                max_batch_size: int = 256, normalize: bool = True, on_batch: OnBatch | None = None,
                stats: EmbedStats | None = None) -> torch.Tensor:
    """Embed captions with token-budget batches; duplicates are embedded once.

    Args:
        encoder: The caption encoder (its settings decide template, pooling, attention).
        texts: ``N`` captions.
        max_tokens: Token budget per forward pass (see :func:`plan_batches`).
        max_batch_size: Most captions per forward pass.
        normalize: L2-normalise (in fp32).
        on_batch: Called after each batch with its caption count and real-token count.
        stats: Counters to add to (truncation at ``encoder.settings.max_length`` included).

    Returns:
        ``(N, D)`` float32 on CPU, in input order.
    """
    started, stats = time.perf_counter(), stats if stats is not None else EmbedStats()
    unique = list(dict.fromkeys(texts))
    out = torch.empty(len(unique), encoder.dim, dtype=torch.float32)
    was_training = encoder.training
    encoder.eval()
    left = encoder.tokenizer.padding_side == "left"
    # packed encoders compute no padding in their GEMMs: batches fill the whole budget
    max_padding = 1.0 if encoder.packed is not None else MAX_PADDING
    try:
        for start in range(0, len(unique), CHUNK):
            with encoder.count_truncation() as cut:
                enc = encoder.tokenize(list(unique[start : start + CHUNK]))  # each (n, L), padded
            stats.add(EmbedStats(truncated=cut.truncated, truncated_tokens=cut.tokens,
                                 truncated_tokens_max=cut.tokens_max))
            lengths = enc["attention_mask"].sum(1)
            for idx in plan_batches(lengths.tolist(), max_tokens, max_batch_size, max_padding):
                rows = torch.tensor(idx)
                width = int(lengths[rows].max())
                cols = slice(-width, None) if left else slice(0, width)  # drop all-pad columns
                batch = {k: v[rows][:, cols] for k, v in enc.items()}
                emb = (encoder.packed.embed(batch, encoder.settings.pooling) if encoder.packed is not None
                       else encoder(**batch).float())  # (b, D)
                out[rows + start] = (F.normalize(emb, dim=-1) if normalize else emb).cpu()
                real = int(lengths[rows].sum())
                stats.batches, stats.tokens, stats.padded_tokens = (
                    stats.batches + 1, stats.tokens + real, stats.padded_tokens + len(idx) * width)
                if on_batch is not None:
                    on_batch(len(idx), real)
    finally:
        encoder.train(was_training)
    stats.captions += len(texts)
    stats.unique += len(unique)
    stats.seconds += time.perf_counter() - started
    if on_batch is not None and len(texts) > len(unique):
        on_batch(len(texts) - len(unique), 0)  # duplicates are done too (progress totals add up)
    if len(unique) == len(texts):
        return out
    where = {t: i for i, t in enumerate(unique)}
    return out[torch.tensor([where[t] for t in texts], dtype=torch.long)]


# ------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class EmbedOptions:
    """What a worker needs to embed shards (picklable: it crosses process boundaries).

    Attributes:
        encoder: Resolved local encoder dir.
        out: Local output dir for sidecars and done-markers.
        caption_fields: Fields embedded, one ``.npy`` each per sample.
        identity: What a finished sidecar must have been made with (fingerprint, dtype, ...).
        dtype: Stored dtype (``float16`` / ``float32``).
        normalize: L2-normalise before storing.
        max_tokens, max_batch_size: Batching (see :func:`plan_batches`).
        device: ``cpu`` or ``cuda``; workers take ``cuda:<worker % gpus>``.
        precision: ``fp32`` or ``bf16`` model weights.
        threads: Torch threads per process.
        endpoint_url: S3 endpoint for ``s3://`` image shards.
        max_length: Token budget per caption; 0 = the encoder's own (its settings file).
    """

    encoder: str
    out: str
    caption_fields: tuple[str, ...]
    identity: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"
    normalize: bool = True
    max_tokens: int = 1024
    max_batch_size: int = 256
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 1
    endpoint_url: str = ""
    max_length: int = 0


@dataclass(frozen=True)
class ShardJob:
    """One image shard to embed (an entry of the data manifest)."""

    split: str
    name: str
    url: str
    sha256: str
    count: int


def load_encoder(opts: EmbedOptions, worker: int = 0) -> CaptionEncoder:
    """The encoder on this worker's device, in the configured precision, ready for inference."""
    device = opts.device
    if device == "cuda":
        device = f"cuda:{worker % max(1, torch.cuda.device_count())}"
    dtype = torch_dtype(opts.precision)
    encoder = CaptionEncoder.from_pretrained(opts.encoder, dtype=dtype, device=device,
                                             max_length=opts.max_length or None).eval()
    encoder.enable_packed_inference()
    return encoder


def _stored(vectors: torch.Tensor, dtype: str, shard: str) -> np.ndarray:
    array = vectors.numpy().astype(dtype)
    if not np.isfinite(array).all():
        raise StageError(f"{shard}: embeddings overflow {dtype} (raw vectors too large); set "
                         "embed_captions.dtype=float32 or embed_captions.normalize=true")
    return array


def embed_shard(encoder: CaptionEncoder, job: ShardJob, opts: EmbedOptions,
                on_batch: OnBatch | None = None) -> dict[str, Any]:
    """Embed every caption of one image shard and write its sidecar + done-marker.

    Returns:
        The done-marker: identity, image shard + sha256, sidecar name + sha256, count, dim and
        this shard's counters (captions, unique, tokens, seconds).

    Raises:
        StageError: the image shard differs from the data manifest, or vectors overflow.
    """
    records = sidecars.read_shard_records(job.url, job.sha256, opts.endpoint_url)
    if len(records) != job.count:
        raise StageError(f"{job.url}: {len(records)} samples, the data manifest says {job.count}; "
                         "re-run prepare_data")
    spans, texts = [], []  # spans[sample][field] = (start, end) into texts
    for _, meta in records:
        captions = meta.get("captions") or {}
        spans.append({})
        for f in opts.caption_fields:
            values = captions.get(f) or []
            values = [values] if isinstance(values, str) else [str(v) for v in values]
            spans[-1][f] = (len(texts), len(texts) + len(values))
            texts.extend(values)
    stats = EmbedStats()
    vectors = embed_texts(encoder, texts, max_tokens=opts.max_tokens, max_batch_size=opts.max_batch_size,
                          normalize=opts.normalize, on_batch=on_batch, stats=stats)  # (n, D)
    stored = _stored(vectors, opts.dtype, job.name)
    arrays = [{f: stored[a:b] for f, (a, b) in s.items()} for s in spans]
    out, name = Path(opts.out), sidecars.sidecar_name(job.name)
    digest = sidecars.write_sidecar(out / name, [k for k, _ in records], arrays)
    marker = {**opts.identity, "image_shard": job.name, "image_sha256": job.sha256, "split": job.split,
              "name": name, "sha256": digest, "count": len(records), "dim": encoder.dim,
              "stats": dataclasses.asdict(stats)}
    sidecars.write_marker(out, job.name, marker)  # last: the sidecar is finished only now
    return marker


# ------------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(opts: EmbedOptions, queue: Any, counter: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # torch threads own the cores
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    torch.set_num_threads(opts.threads)
    _WORKER.update(opts=opts, queue=queue, encoder=load_encoder(opts, index))


def _worker_shard(job: ShardJob) -> dict[str, Any]:
    queue = _WORKER["queue"]
    return embed_shard(_WORKER["encoder"], job, _WORKER["opts"], lambda c, t: queue.put((c, t)))


def _worker_texts(texts: list[str]) -> np.ndarray:
    opts, queue = _WORKER["opts"], _WORKER["queue"]
    return embed_texts(_WORKER["encoder"], texts, max_tokens=opts.max_tokens,
                       max_batch_size=opts.max_batch_size, normalize=opts.normalize,
                       on_batch=lambda c, t: queue.put((c, t))).numpy()


def _in_process(jobs: list[ShardJob], opts: EmbedOptions, texts: list[str], on_batch: OnBatch | None):
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        encoder = load_encoder(opts)
        markers = [embed_shard(encoder, job, opts, on_batch) for job in jobs]
        extra = embed_texts(encoder, texts, max_tokens=opts.max_tokens, max_batch_size=opts.max_batch_size,
                            normalize=opts.normalize, on_batch=on_batch).numpy() if texts else None
        return markers, extra
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _drain(queue: Any, on_batch: OnBatch | None) -> None:
    import queue as queue_module

    while True:
        try:
            captions, tokens = queue.get_nowait()
        except queue_module.Empty:
            return
        if on_batch is not None:
            on_batch(captions, tokens)


def _in_pool(jobs: list[ShardJob], opts: EmbedOptions, texts: list[str], workers: int,
             on_batch: OnBatch | None):
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
    queue, counter = ctx.Queue(), ctx.Value("i", 0)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, queue, counter)) as pool:
        # longest shards first, so the last one to finish is a short one
        futures = [pool.submit(_worker_shard, j) for j in sorted(jobs, key=lambda j: -j.count)]
        extra = pool.submit(_worker_texts, texts) if texts else None
        pending = set(futures) | ({extra} if extra else set())
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(queue, on_batch)
            failed = [f.exception() for f in done if f.exception() is not None]
            if failed:
                pool.shutdown(cancel_futures=True)
                if isinstance(failed[0], BrokenProcessPool):
                    raise StageError(f"an embedding worker died ({failed[0]}); out of memory? "
                                     "lower embed_captions.num_workers or max_tokens") from failed[0]
                raise failed[0]
        _drain(queue, on_batch)
        return [f.result() for f in futures], extra.result() if extra else None


def run_jobs(jobs: Sequence[ShardJob], opts: EmbedOptions, *, num_workers: int = 1,
             texts: Sequence[str] = (), on_batch: OnBatch | None = None,
             ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Embed shards (and optionally a list of extra texts) in this process or in a pool.

    Args:
        jobs: Image shards to embed; each gets a sidecar + done-marker in ``opts.out``.
        opts: Encoder, batching, storage and device settings.
        num_workers: Processes; 1 = this process (no spawn cost).
        texts: Extra captions (e.g. zero-shot prompts) embedded by the same encoder.
        on_batch: Progress callback (captions, tokens), called in this process.

    Returns:
        ``(done-markers in job order, (len(texts), D) float32 array or None)``.
    """
    jobs, texts = list(jobs), list(texts)
    if not jobs and not texts:
        return [], None  # everything was kept: do not even load the encoder
    workers = min(num_workers, len(jobs) + bool(texts))
    if workers <= 1:
        return _in_process(jobs, opts, texts, on_batch)
    markers, extra = _in_pool(jobs, opts, texts, workers, on_batch)
    order = {j.name: i for i, j in enumerate(jobs)}
    return sorted(markers, key=lambda m: order[m["image_shard"]]), extra


def plan_jobs(out: Path, data_dir: str, manifest: dict[str, Any], identity: dict[str, Any],
              ) -> tuple[list[ShardJob], list[dict[str, Any]]]:
    """Split the data manifest's shards into work to do and finished sidecars to keep.

    A sidecar is kept when its done-marker matches ``identity`` plus the image shard's sha256
    and the sidecar's sha256 still equals the marker's (:func:`sidecars.marker_matches`).

    Returns:
        ``(jobs, done-markers of the kept sidecars)``.
    """
    base, jobs, kept = str(data_dir).rstrip("/"), [], []
    for split, entries in manifest["shards"].items():
        for e in entries:
            done = sidecars.marker_matches(out, e["name"], {**identity, "image_sha256": e["sha256"]})
            if done is not None:
                kept.append(done)
            else:
                jobs.append(ShardJob(split, e["name"], f"{base}/{e['name']}", e["sha256"], e["count"]))
    return jobs, kept
