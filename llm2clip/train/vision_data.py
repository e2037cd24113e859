"""train_vision data: image shards + embedding sidecars in lockstep, resampled, resumable.

Each (rank, loader worker) draws shard pairs ``(X.tar, X_text_embeddings.tar)`` *with
replacement* (open_clip ``--dataset-resampled``, ``ResampledShards2``), reads each pair in lockstep
with a key check on every sample (:func:`llm2clip.data.sidecars.iter_shard_pair`), shuffles
through a buffer (``webdataset.shuffle``), then per sample picks one caption type by the
configured mix (reference: short/long 50/50) and one of its ``k`` captions, crops
(``RandomResizedCrop(0.9-1.0)``, bicubic) and normalises.

Determinism and exact resume: every random choice comes from generators seeded by
``(seed, rank, stream, position)``, never by wall clock or pid. Micro-batch ``i`` of a rank is
the ``i // W``-th batch of stream ``i % W`` (``W`` = loader workers; the torch DataLoader hands
batch ``i`` to worker ``i % W``). Resuming at micro-batch ``k``, worker ``w`` plays stream
``(w + k) % W`` and skips that stream's first batches *before* decoding (only tar bytes are
read), so the batches from ``k`` on are exactly those an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llm2clip.data.shards import shard_paths
from llm2clip.data.sidecars import iter_lockstep, iter_shard_pair, sidecar_name
from llm2clip.io import StageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPair:
    """One image shard, its embedding sidecar and its sample count."""

    image: str
    sidecar: str
    count: int


def shard_pairs(data_dir: str, embeddings_dir: str, split: str, manifest: dict[str, Any]) -> list[ShardPair]:
    """The non-empty shard pairs of ``split`` (paths or ``s3://`` URLs), in manifest order."""
    base = str(embeddings_dir).rstrip("/")
    images = shard_paths(data_dir, split, manifest)
    return [ShardPair(url, f"{base}/{sidecar_name(entry['name'])}", int(entry["count"]))
            for url, entry in zip(images, manifest["shards"].get(split, []), strict=True) if entry["count"]]


def resolve_caption_mix(mix: dict[str, float], caption_fields: Sequence[str],
                        available: Sequence[str]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Caption fields and normalised weights to sample from.

    Args:
        mix: Field -> weight from the config; empty = equal weights over ``caption_fields``.
        caption_fields: ``common.caption_fields``.
        available: Fields the embedding sidecars hold.

    Raises:
        StageError: a field of the mix has no embeddings.
    """
    mix = {f: w for f, w in (mix or {f: 1.0 for f in caption_fields}).items() if w > 0}
    missing = sorted(set(mix) - set(available))
    if missing:
        raise StageError(f"train_vision.caption_mix uses {missing}, but the embeddings only hold "
                         f"{list(available)}; fix the mix or re-run embed_captions")
    total = sum(mix.values())
    fields = tuple(f for f in caption_fields if f in mix) + tuple(sorted(set(mix) - set(caption_fields)))
    return fields, tuple(mix[f] / total for f in fields)


def pick_caption(arrays: dict[str, np.ndarray], fields: Sequence[str], weights: Sequence[float],
                 rng: random.Random, key: str = "") -> tuple[np.ndarray, str]:
    """One caption embedding: a field by ``weights`` (among those with captions), then one row.

    Args:
        arrays: ``{field: (k, D)}`` of one sample.
        fields: Candidate fields; weights: their probabilities.
        rng: The sample's generator.
        key: Sample key, for the error message.

    Returns:
        ``((D,) array, field)``.
    """
    present = [(f, w) for f, w in zip(fields, weights, strict=True) if f in arrays and len(arrays[f])]
    if not present:
        raise StageError(f"sample {key!r} has no caption embedding in any of {list(fields)}")
    field = rng.choices([f for f, _ in present], weights=[w for _, w in present])[0]
    rows = arrays[field]
    return rows[rng.randrange(len(rows))], field


def batches_served(count: int, stream: int, streams: int) -> int:
    """How many of micro-batches ``0 .. count-1`` belong to ``stream`` (``i % streams == stream``)."""
    return max(0, (count - stream + streams - 1) // streams)


class TrainStream(IterableDataset):
    """Batches ``{"pixels": (B, 3, S, S) f32, "text": (B, D) f32, "keys", "fields"}`` of one rank.

    Args:
        pairs: Shard pairs of the train split.
        transform: ``TrainTransform`` (picklable), called as ``transform(image, rng)``.
        batch_size: Samples per micro-batch.
        fields, weights: The caption mix (:func:`resolve_caption_mix`).
        seed: Base seed of the stage.
        rank: This process's rank (each rank reads its own resampled streams).
        workers: DataLoader workers (0 loads in-process and counts as one stream).
        start: First micro-batch to produce (resume point).
        total: Micro-batches of the whole run; the stream yields ``total - start`` of them.
        shuffle_buffer: Samples in the shuffle buffer (0 = no shuffle).
        endpoint_url: S3 endpoint for ``s3://`` shards.
    """

    def __init__(self, pairs: Sequence[ShardPair], transform: Any, *, batch_size: int,
                 fields: Sequence[str], weights: Sequence[float], seed: int, rank: int, workers: int,
                 start: int, total: int, shuffle_buffer: int = 1000, endpoint_url: str = "") -> None:
        super().__init__()
        if not pairs:
            raise StageError("the train split has no samples")
        self.pairs, self.transform, self.batch_size = list(pairs), transform, batch_size
        self.fields, self.weights = tuple(fields), tuple(weights)
        self.seed, self.rank, self.streams = seed, rank, max(1, workers)
        self.start, self.total = start, total
        self.shuffle_buffer, self.endpoint_url = shuffle_buffer, endpoint_url

    def _tag(self, stream: int) -> str:
        return f"train_vision/{self.seed}/{self.rank}/{stream}"

    def _samples(self, stream: int) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Endless resampled lockstep samples ``(PreparedSample with jpg bytes, arrays)``."""
        import webdataset as wds

        shard_rng = random.Random(f"{self._tag(stream)}/shards")

        def resampled():
            while True:
                pair = shard_rng.choice(self.pairs)
                yield from iter_shard_pair(pair.image, pair.sidecar, endpoint_url=self.endpoint_url,
                                           decode=False)

        samples = resampled()
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100),
                                  seed=f"{self._tag(stream)}/shuffle")(samples)
        return samples

    def _decode(self, sample: Any, arrays: dict[str, np.ndarray], rng: random.Random):
        from PIL import Image

        text, field = pick_caption(arrays, self.fields, self.weights, rng, sample.key)
        image = Image.open(io.BytesIO(sample.image))
        return self.transform(image, rng), np.asarray(text, dtype=np.float32), field

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.start) % self.streams
        skip = batches_served(self.start, stream, self.streams)
        count = batches_served(self.total - self.start, worker, self.streams)
        position = skip * self.batch_size  # index of the next sample in this stream
        samples = itertools.islice(self._samples(stream), position, None)  # skipped undecoded
        for _ in range(count):
            pixels, texts, keys, fields = [], [], [], []
            for sample, arrays in itertools.islice(samples, self.batch_size):
                rng = random.Random(f"{self._tag(stream)}/{position}")
                image, text, field = self._decode(sample, arrays, rng)
                pixels.append(image)
                texts.append(text)
                keys.append(sample.key)
                fields.append(field)
                position += 1
            yield {"pixels": torch.from_numpy(np.stack(pixels)), "text": torch.from_numpy(np.stack(texts)),
                   "keys": keys, "fields": fields}


def make_loader(stream: TrainStream, workers: int) -> DataLoader:
    """A DataLoader over ready-made batches (``batch_size=None``); workers keep batch order."""
    kwargs: dict[str, Any] = {"prefetch_factor": 4} if workers else {}
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False, **kwargs)


def iter_val_batches(data_dir: str, embeddings_dir: str, transform: Any, fields: Sequence[str], *,
                     batch_size: int, max_samples: int = 0, endpoint_url: str = "",
                     ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Val pairs for 1:1 retrieval: each image (eval transform) with the first caption of each field.

    Samples lacking a caption of any of ``fields`` are left out (1:1 needs a pair per field).

    Yields:
        ``(pixels (b, 3, S, S), {field: text_embeddings (b, D)})`` float32, in shard order.
    """
    pixels: list[np.ndarray] = []
    texts: dict[str, list[np.ndarray]] = {f: [] for f in fields}

    def emit():
        return (torch.from_numpy(np.stack(pixels)),
                {f: torch.from_numpy(np.stack(rows)) for f, rows in texts.items()})

    samples = iter_lockstep(data_dir, embeddings_dir, "val", endpoint_url=endpoint_url)
    for sample, arrays in itertools.islice(samples, max_samples or None):
        if not all(f in arrays and len(arrays[f]) for f in fields):
            continue
        pixels.append(transform(sample.image))
        for f in fields:
            texts[f].append(np.asarray(arrays[f][0], dtype=np.float32))
        if len(pixels) == batch_size:
            yield emit()
            pixels, texts = [], {f: [] for f in fields}
    if pixels:
        yield emit()
