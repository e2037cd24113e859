"""How many captions a token budget cut, and by how much.

Captions are tokenized with ``truncation=True, max_length=N`` (training, CRA, MNTP, embedding).
Only a row that came out exactly ``N`` tokens long can have been cut, so only those rows are
tokenized a second time without truncation to measure what was lost: the tokens cut of a caption
are ``len(untruncated) - N`` (special tokens stay, truncation drops text tokens from the end).
The cost is a second tokenizer call for the few captions at the limit, nothing for the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def tokens_cut(tokenizer: Any, texts: Sequence[str], lengths: Sequence[int], max_length: int) -> list[int]:
    """Tokens truncation removed from each text.

    Args:
        tokenizer: The tokenizer that truncated ``texts`` (same special-token settings).
        texts: The strings it tokenized.
        lengths: Their token counts after truncation (``attention_mask.sum(1)``).
        max_length: The budget they were truncated to.

    Returns:
        One count per text; 0 for a text that fit.
    """
    cut = [0] * len(texts)
    at_limit = [i for i, n in enumerate(lengths) if int(n) >= max_length]
    if at_limit:
        full = tokenizer([texts[i] for i in at_limit], truncation=False, verbose=False)["input_ids"]
        for i, ids in zip(at_limit, full, strict=True):
            cut[i] = max(0, len(ids) - max_length)
    return cut


@dataclass
class TruncationCount:
    """Counters of captions tokenized under a token budget.

    Attributes:
        captions: Captions tokenized.
        truncated: Captions longer than the budget (cut).
        tokens: Tokens cut in total.
        tokens_max: Most tokens cut from one caption.
    """

    captions: int = 0
    truncated: int = 0
    tokens: int = 0
    tokens_max: int = 0

    def add(self, cut: Iterable[int]) -> None:
        """Count one tokenized batch (``cut``: tokens cut per caption, see :func:`tokens_cut`)."""
        for n in cut:
            self.captions += 1
            if n > 0:
                self.truncated += 1
                self.tokens += n
                self.tokens_max = max(self.tokens_max, n)

    def merge(self, other: TruncationCount) -> TruncationCount:
        """Add ``other``'s counters to these (in place); returns self."""
        self.captions += other.captions
        self.truncated += other.truncated
        self.tokens += other.tokens
        self.tokens_max = max(self.tokens_max, other.tokens_max)
        return self

    def all_reduce(self, device: torch.device | str = "cpu") -> TruncationCount:
        """These counters summed over ranks (``tokens_max``: the max); a collective on every rank."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return dataclasses.replace(self)
        sums = torch.tensor([self.captions, self.truncated, self.tokens], dtype=torch.long, device=device)
        peak = torch.tensor([self.tokens_max], dtype=torch.long, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        captions, truncated, tokens = (int(v) for v in sums.tolist())
        return TruncationCount(captions, truncated, tokens, int(peak.item()))

    @property
    def fraction(self) -> float:
        return self.truncated / self.captions if self.captions else 0.0

    def to_dict(self, max_length: int | None = None) -> dict[str, Any]:
        """The manifest form: counts, the cut share and (if given) the budget."""
        out: dict[str, Any] = {"captions": self.captions, "truncated_captions": self.truncated,
                               "truncated_fraction": self.fraction, "truncated_tokens": self.tokens,
                               "truncated_tokens_max": self.tokens_max}
        return out if max_length is None else {**out, "max_length": max_length}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TruncationCount:
        """Inverse of :meth:`to_dict` (None or ``{}``: zeros)."""
        data = data or {}
        return cls(int(data.get("captions", 0)), int(data.get("truncated_captions", 0)),
                   int(data.get("truncated_tokens", 0)), int(data.get("truncated_tokens_max", 0)))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """MLflow metrics ``<prefix>truncated_captions``, ``..._fraction``, ``..._tokens_max``."""
        return {f"{prefix}truncated_captions": self.truncated, f"{prefix}truncated_fraction": self.fraction,
                f"{prefix}truncated_tokens_max": self.tokens_max}

    def describe(self, what: str, max_length: int | None) -> str:
        """``"<what>: 3 of 1000 captions (0.30%) cut at 128 tokens (tokens cut: 41 total, 20 max)"``."""
        return (f"{what}: {self.truncated} of {self.captions} captions ({100 * self.fraction:.2f}%) cut at "
                f"{max_length} tokens (tokens cut: {self.tokens} total, {self.tokens_max} max)")
