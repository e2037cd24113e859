"""Fast batched caption embedding for embed_captions (and anything that embeds many captions).

Why it is faster than ``CaptionEncoder.encode`` with a fixed batch size:

- **token-budget batches**: captions are tokenized once per chunk, sorted by token length and
  packed until ``captions x longest`` reaches ``max_tokens``, so short captions go in big
  batches, long ones in small batches, and almost no compute is spent on padding;
- **padding trimmed per batch**: a batch only keeps the columns its longest caption needs;
- **inference_mode**, no graph, and duplicate captions embedded once;
- **packed tokens** for Llama-family encoders (:mod:`llm2clip.text.packed`): no GEMM computes a
  padded position, q/k/v and gate/up run as one GEMM each, residual adds run inside the GEMMs;
- **per-shard work in processes**: :func:`run_jobs` splits the image shards over worker
  processes, deterministically (:func:`assign_work`): by default one per visible GPU, each on its
  own ``cuda:w`` (:func:`worker_slots`); on CPU ``num_workers`` processes with
  ``cores // num_workers`` torch threads each.

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
        device: ``cpu`` or ``cuda``; worker ``w`` takes ``cuda:w`` (:func:`worker_slots`).
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


def load_encoder(opts: EmbedOptions, device: str | None = None) -> CaptionEncoder:
    """The encoder on ``device`` (default ``opts.device``), in the configured precision, ready for
    inference (packed where the model allows it)."""
    dtype = torch_dtype(opts.precision)
    encoder = CaptionEncoder.from_pretrained(opts.encoder, dtype=dtype, device=device or opts.device,
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


@dataclass(frozen=True)
class WorkerSlot:
    """One embedding worker process.

    Attributes:
        index: Worker number ``w`` (0, 1, ...).
        device: The torch device it loads the encoder on: ``cuda:<w>`` (one GPU per worker) or
            ``cpu``.
        gpu: That GPU as the machine names it: the ``w``-th entry of ``CUDA_VISIBLE_DEVICES``
            (an index or a UUID), else ``w``; ``""`` on CPU.
    """

    index: int
    device: str
    gpu: str = ""

    def describe(self) -> str:
        return self.device if not self.gpu or self.gpu == self.device.removeprefix("cuda:") else \
            f"{self.device} (GPU {self.gpu})"


def resolve_workers(num_workers: int, device: str, gpus: int, cuda_visible_devices: str | None = None) -> int:
    """How many worker processes embed_captions runs.

    Args:
        num_workers: ``embed_captions.num_workers``; 0 = auto.
        device: The resolved device, ``cpu`` or ``cuda``.
        gpus: CUDA devices this process sees: ``torch.cuda.device_count()``, which counts only
            the ones ``CUDA_VISIBLE_DEVICES`` lets through (0 on CPU).
        cuda_visible_devices: The ``CUDA_VISIBLE_DEVICES`` value (None: unset), for the message.

    Returns:
        ``num_workers`` when set; auto: one per visible GPU on CUDA, 1 on CPU (one process whose
        torch threads use every core, as before auto existed).

    Raises:
        StageError: CUDA asked for but no CUDA device visible.
    """
    if num_workers < 0:
        raise StageError(f"embed_captions.num_workers: must be >= 0 (0 = auto), got {num_workers}")
    if device.startswith("cuda") and gpus < 1:
        visible = "<unset>" if cuda_visible_devices is None else cuda_visible_devices
        raise StageError(f"embed_captions.device is cuda but this process sees no CUDA device "
                         f"(CUDA_VISIBLE_DEVICES={visible}); set embed_captions.device: cpu or run on a GPU node")
    if num_workers:
        return num_workers
    return gpus if device.startswith("cuda") else 1


def worker_slots(workers: int, device: str, gpus: int, cuda_visible_devices: str | None = None,
                 ) -> list[WorkerSlot]:
    """The device of every worker: worker ``w`` takes ``cuda:w``, one process per GPU.

    Only when more workers than visible GPUs are asked for (``num_workers`` set explicitly)
    do GPUs take several workers, round robin: worker ``w`` on ``cuda:(w % gpus)``. On CPU every
    worker is ``cpu`` (they share the cores: ``threads`` each).

    Args:
        workers: Worker processes (:func:`resolve_workers`).
        device: ``cpu`` or ``cuda``.
        gpus: Visible CUDA devices (``torch.cuda.device_count()``).
        cuda_visible_devices: The ``CUDA_VISIBLE_DEVICES`` value (None: unset), only to name the
            physical GPU behind each ``cuda:w`` in logs: ``cuda:w`` is its ``w``-th entry.

    Returns:
        ``workers`` slots, in worker order.
    """
    if not device.startswith("cuda"):
        return [WorkerSlot(w, "cpu") for w in range(workers)]
    if gpus < 1:
        raise StageError("embed_captions.device is cuda but this process sees no CUDA device")
    names = [e.strip() for e in cuda_visible_devices.split(",")] if cuda_visible_devices else []
    slots = []
    for w in range(workers):
        local = w % gpus
        slots.append(WorkerSlot(w, f"cuda:{local}", names[local] if local < len(names) else str(local)))
    return slots


def assign_work(counts: Sequence[int], workers: int, texts: int = 0, fields: int = 1,
                ) -> list[tuple[list[int], bool]]:
    """Which worker embeds which shards: a pure function of the shard sizes and the worker count.

    Items are the shards (cost ``count x fields``: one caption per field and sample, the same
    estimate the progress bar starts from) and, when ``texts`` > 0, the extra texts as one more
    item (cost ``texts``). Longest processing time first: items in order of decreasing cost
    (ties: shards in job order, the texts after them), each to the worker with the least cost so
    far (ties: the lowest worker number). Equal shards therefore go round robin 0, 1, 2, ...
    Every worker runs its shards in the order given. The vectors do not depend on it: each shard
    is embedded on its own (:func:`embed_shard`).

    Args:
        counts: Samples per shard, in job order.
        workers: Worker processes (>= 1).
        texts: Number of extra texts (zero-shot prompts), 0 = none.
        fields: Caption fields per sample.

    Returns:
        Per worker: ``(indices into counts, whether it embeds the extra texts)``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    items = [(count * max(1, fields), i) for i, count in enumerate(counts)]
    if texts:
        items.append((texts, len(counts)))  # index len(counts) = the texts
    items.sort(key=lambda item: (-item[0], item[1]))
    load = [0] * workers
    parts: list[tuple[list[int], bool]] = [([], False) for _ in range(workers)]
    for cost, i in items:
        w = min(range(workers), key=lambda k: (load[k], k))
        load[w] += cost
        if i == len(counts):
            parts[w] = (parts[w][0], True)
        else:
            parts[w][0].append(i)
    return parts


def _embed_extra(encoder: CaptionEncoder, texts: list[str], opts: EmbedOptions,
                 on_batch: OnBatch | None) -> np.ndarray:
    return embed_texts(encoder, texts, max_tokens=opts.max_tokens, max_batch_size=opts.max_batch_size,
                       normalize=opts.normalize, on_batch=on_batch).numpy()


def _in_process(jobs: list[ShardJob], opts: EmbedOptions, texts: list[str], slot: WorkerSlot,
                on_batch: OnBatch | None):
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        encoder = load_encoder(opts, slot.device)
        markers = [embed_shard(encoder, job, opts, on_batch) for job in jobs]
        return markers, _embed_extra(encoder, texts, opts, on_batch) if texts else None
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _sendable(err: BaseException, slot: WorkerSlot) -> BaseException:
    """``err`` if it survives pickling (StageError does), else a StageError that names it."""
    import pickle  # nosec B403  # only our own exception objects, round-tripped in this process

    try:
        pickle.loads(pickle.dumps(err))  # nosec B301  # the bytes were just made from ``err``
        return err
    except Exception:  # noqa: BLE001 - any exception that cannot cross the process boundary
        return StageError(f"embedding worker {slot.index} ({slot.describe()}): {type(err).__name__}: {err}")


def _worker_main(slot: WorkerSlot, jobs: list[ShardJob], texts: list[str], opts: EmbedOptions,
                 queue: Any) -> None:
    """One worker process: load the encoder on ``slot.device``, embed ``jobs`` then ``texts``.

    Messages on ``queue``: ``(kind, worker, payload)`` with kind ``batch`` (captions, tokens),
    ``shard`` (a done-marker), ``texts`` (the extra vectors), ``done`` or ``error``.
    """
    import traceback

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # torch threads own the cores
    try:
        torch.set_num_threads(opts.threads)
        if slot.device.startswith("cuda"):
            torch.cuda.set_device(slot.device)  # nothing lands on another worker's GPU

        def report(captions: int, tokens: int) -> None:
            queue.put(("batch", slot.index, (captions, tokens)))

        encoder = load_encoder(opts, slot.device)
        for job in jobs:
            queue.put(("shard", slot.index, embed_shard(encoder, job, opts, report)))
        if texts:
            queue.put(("texts", slot.index, _embed_extra(encoder, texts, opts, report)))
        queue.put(("done", slot.index, None))
    except BaseException as err:  # noqa: BLE001 - the parent re-raises it
        queue.put(("error", slot.index, (_sendable(err, slot), traceback.format_exc())))


def _in_workers(parts: list[tuple[list[int], bool]], slots: list[WorkerSlot], jobs: list[ShardJob],
                texts: list[str], opts: EmbedOptions, on_batch: OnBatch | None):
    """Run one spawned process per slot on its share of the work; collect markers and vectors.

    Raises:
        The first worker's exception (the others are stopped), or StageError when a worker
        died without one (killed: out of memory, a signal).
    """
    import multiprocessing
    import queue as queue_module

    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, name=f"embed-worker-{slot.index}", daemon=True,
                         args=(slot, [jobs[i] for i in idx], texts if with_texts else [], opts, messages))
             for slot, (idx, with_texts) in zip(slots, parts, strict=True)]
    markers: list[dict[str, Any]] = []
    extra, finished, ok = None, set(), False
    try:
        for proc in procs:
            proc.start()
        while len(finished) < len(procs):
            try:
                kind, w, payload = messages.get(timeout=0.5)
            except queue_module.Empty:
                dead = [w for w, p in enumerate(procs) if w not in finished and p.exitcode is not None]
                if dead and messages.empty():  # a worker puts its last message before it exits
                    w = dead[0]
                    raise StageError(
                        f"embedding worker {w} ({slots[w].describe()}) died with exit code "
                        f"{procs[w].exitcode}; out of memory? lower embed_captions.num_workers or max_tokens"
                    ) from None
                continue
            if kind == "batch":
                if on_batch is not None:
                    on_batch(*payload)
            elif kind == "shard":
                markers.append(payload)
            elif kind == "texts":
                extra = payload
            elif kind == "done":
                finished.add(w)
            else:  # error
                err, trace = payload
                if not isinstance(err, StageError):
                    log.error("embedding worker %d (%s) failed:\n%s", w, slots[w].describe(), trace)
                raise err
        ok = True
        return markers, extra
    finally:
        started = [proc for proc in procs if proc.pid is not None]
        for proc in started:  # finished workers exit on their own; after a failure nobody waits
            if ok:
                proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        for proc in started:
            proc.join(timeout=30)
        messages.close()


def run_jobs(jobs: Sequence[ShardJob], opts: EmbedOptions, *, num_workers: int = 1,
             texts: Sequence[str] = (), on_batch: OnBatch | None = None, gpus: int | None = None,
             ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Embed shards (and optionally a list of extra texts) in this process or in worker processes.

    Workers: :func:`resolve_workers` (0 = one per visible GPU on CUDA, 1 on CPU), at most one per
    item of work; worker ``w`` runs on :func:`worker_slots`' device (``cuda:w``) and embeds the
    shards :func:`assign_work` gives it. One worker runs in this process (no spawn cost). The
    sidecars, markers and vectors are the same for any worker count (with the same
    ``opts.threads``: on CPU the thread count decides the float summation order).

    Args:
        jobs: Image shards to embed; each gets a sidecar + done-marker in ``opts.out``.
        opts: Encoder, batching, storage and device settings.
        num_workers: Processes; 0 = auto.
        texts: Extra captions (e.g. zero-shot prompts) embedded by the same encoder.
        on_batch: Progress callback (captions, tokens), called in this process.
        gpus: Visible CUDA devices; None = ``torch.cuda.device_count()`` (when ``opts.device``
            is CUDA).

    Returns:
        ``(done-markers in job order, (len(texts), D) float32 array or None)``.
    """
    jobs, texts = list(jobs), list(texts)
    if not jobs and not texts:
        return [], None  # everything was kept: do not even load the encoder
    cuda = opts.device.startswith("cuda")
    if gpus is None:
        gpus = torch.cuda.device_count() if cuda else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    workers = min(resolve_workers(num_workers, opts.device, gpus, visible), len(jobs) + bool(texts))
    slots = worker_slots(workers, opts.device, gpus, visible)
    parts = assign_work([j.count for j in jobs], workers, len(texts), len(opts.caption_fields))
    for slot, (idx, with_texts) in zip(slots, parts, strict=True):
        log.info("embed worker %d on %s: %d shards (%d samples)%s", slot.index, slot.describe(), len(idx),
                 sum(jobs[i].count for i in idx), f" + {len(texts)} texts" if with_texts else "")
    if workers <= 1:
        return _in_process(jobs, opts, texts, slots[0], on_batch)
    markers, extra = _in_workers(parts, slots, jobs, texts, opts, on_batch)
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
