"""Text pairs (E5 / Echo style) mixed into the caption-contrastive batches.

The LLM2CLIP reference tunes its caption encoder on captions *and* plain text pairs (LLM2Vec's
E5 / Echo data), so the LLM keeps its text distribution. Here a text-pair file is a JSONL (or
``.jsonl.gz``) or parquet file, local or ``s3://``, with one pair per row:

======== ======================================================================
column   meaning
======== ======================================================================
query    the text that is embedded with the source's instruction in front
positive the text the query must retrieve
negative optional hard negative; a row without one gets another pair's positive
======== ======================================================================

The column names are set per file (:class:`llm2clip.config.caption_contrastive.TextPairSource`).
A share ``caption_contrastive.text_pair_ratio`` of every global batch is text pairs, spread
evenly over ranks; which pairs a (step, rank) gets is a pure function of ``(seed, step, rank)``
(a fresh permutation of all pairs each text epoch, as the captions have), so a resumed run sees
exactly the pairs an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm2clip.config.caption_contrastive import TextPairSource
from llm2clip.io import is_remote
from llm2clip.train.loop import step_seed

log = logging.getLogger(__name__)

SEED_OFFSET = 7919  # the text-pair stream's own seeds: adding text pairs leaves the caption draws alone


@dataclass(frozen=True)
class TextPair:
    """One training pair.

    Attributes:
        query: Embedded with ``instruction`` in front.
        positive: What the query must retrieve.
        negative: Hard negative; "" = draw another pair's positive.
        instruction: The source's query instruction.
    """

    query: str
    positive: str
    negative: str = ""
    instruction: str = ""


def _open(path: str, endpoint_url: str, mode: str = "rb"):
    import fsspec

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if is_remote(path) and endpoint_url else {}
    return fsspec.open(path, mode, compression="infer", **options)


def _jsonl_rows(path: str, endpoint_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open(path, endpoint_url, "rt") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{number}", row


def _parquet_rows(path: str, columns: list[str], endpoint_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(f"{path}: reading parquet text pairs needs pyarrow (pip install pyarrow)") from err
    with _open(path, endpoint_url) as handle:
        table = pq.ParquetFile(handle)
        present = [c for c in columns if c in table.schema_arrow.names]
        for number, row in enumerate(table.read(columns=present).to_pylist()):
            yield f"{path} row {number}", row


def read_text_pairs(source: TextPairSource, default_instruction: str = "", endpoint_url: str = ""
                    ) -> tuple[list[TextPair], dict[str, Any]]:
    """Every pair of one file, in file order.

    Args:
        source: The file and its column names.
        default_instruction: The query instruction when ``source.instruction`` is None.
        endpoint_url: S3 endpoint for ``s3://`` paths.

    Returns:
        ``(pairs, summary)``; the summary has ``path``, ``pairs``, ``with_negative`` and
        ``skipped`` (rows whose query or positive is empty).

    Raises:
        ValueError: The query or positive column is missing from a row, or a value is not text.
    """
    instruction = default_instruction if source.instruction is None else source.instruction
    columns = [c for c in (source.query, source.positive, source.negative) if c]
    rows = (_parquet_rows(source.path, columns, endpoint_url) if source.path.endswith(".parquet")
            else _jsonl_rows(source.path, endpoint_url))
    pairs, skipped = [], 0
    for where, row in rows:
        values = []
        for column in columns:
            value = row.get(column)
            if column != source.negative and column not in row:
                raise ValueError(f"{where}: no column {column!r} (the columns are {sorted(row)}; map yours "
                                 "with caption_contrastive.text_pairs[].query / .positive / .negative)")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: column {column!r} must hold text, got {type(value).__name__}")
            values.append((value or "").strip())
        query, positive, negative = (values + [""])[:3]
        if not query or not positive:
            skipped += 1
            continue
        pairs.append(TextPair(query, positive, negative, instruction))
    summary = {"path": source.path, "pairs": len(pairs), "with_negative": sum(bool(p.negative) for p in pairs),
               "skipped": skipped}
    log.info("text pairs %s: %d pairs (%d with a negative, %d empty rows skipped)", source.path, len(pairs),
             summary["with_negative"], skipped)
    return pairs, summary


def load_text_pairs(sources: Sequence[TextPairSource], default_instruction: str = "", endpoint_url: str = ""
                    ) -> tuple[list[TextPair], list[dict[str, Any]]]:
    """The pairs of every source, concatenated in config order, and one summary per source."""
    pairs: list[TextPair] = []
    summaries = []
    for source in sources:
        got, summary = read_text_pairs(source, default_instruction, endpoint_url)
        pairs.extend(got)
        summaries.append(summary)
    return pairs, summaries


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, count)`` of part ``index`` when ``total`` items are cut into ``parts`` near-equal runs."""
    offset = total * index // parts
    return offset, total * (index + 1) // parts - offset


class TextPairSampler:
    """The text pairs of each step: ``per_step`` distinct pairs of a per-epoch permutation.

    Args:
        pairs: All pairs (at least 2, and at least ``per_step``).
        per_step: Text pairs in one global batch.
        seed: Base seed (the stream is offset by :data:`SEED_OFFSET`).
    """

    def __init__(self, pairs: Sequence[TextPair], per_step: int, seed: int) -> None:
        if len(pairs) < max(2, per_step):
            raise ValueError(f"{len(pairs)} text pairs, but a global batch takes {per_step} (and a negative "
                             "needs another pair): lower text_pair_ratio or add pairs")
        self.pairs, self.per_step, self.seed = list(pairs), per_step, seed + SEED_OFFSET
        self.steps_per_epoch = len(self.pairs) // per_step
        self._perm: tuple[int, list[int]] = (-1, [])

    def permutation(self, epoch: int) -> list[int]:
        """The pair order of ``epoch`` (the last one is kept: a step asks once per rank)."""
        if self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.pairs), generator=generator).tolist())
        return self._perm[1]

    def take(self, step: int, rank: int, offset: int, count: int) -> list[tuple[str, str, str, str]]:
        """``count`` (query, positive, negative, instruction) of 1-based ``step``, from ``offset`` of
        the step's global slice on."""
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        start = within * self.per_step + offset
        rng = random.Random(step_seed(self.seed, step, rank))
        out = []
        for index in self.permutation(epoch)[start : start + count]:
            pair = self.pairs[index]
            negative = pair.negative
            if not negative:
                other = rng.randrange(len(self.pairs) - 1)
                negative = self.pairs[other + (other >= index)].positive  # any pair but this one
            out.append((pair.query, pair.positive, negative, pair.instruction))
        return out
