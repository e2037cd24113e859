"""CaptionEncoder: an HF model (decoder LLM or BERT-like encoder) -> one vector per caption.

How a caption is embedded (and the settings file that pins it for later stages):

- **prompt**: ``settings.render`` wraps the caption in a template (a chat wrapper) with an
  optional instruction in front; only the caption and what follows it (the closing token,
  trailing special tokens) are pooled, so instruction and header never enter the vector.
- **bidirectional attention** (decoder LLMs, transformers 5.24): the model gets a 4D mask built
  from the padding mask in which only padded *key columns* are masked (no all-masked rows, no
  NaN), and every attention module gets ``is_causal = False``. Both are needed: eager
  attention ignores ``is_causal`` and only honours the mask, while sdpa (and flash) take the
  causal shortcut from ``is_causal`` when the mask allows it.
- **padding**: left or right; position ids are counted from the first real token, so a caption's
  vector does not depend on what it is batched with.
- **pooling** in fp32: ``mean`` over pooled tokens, or ``eos`` = the last token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip.io import atomic_write_json
from llm2clip.text.loading import load_model, load_tokenizer, model_max_length, resolve_model
from llm2clip.text.packed import PackedDecoder
from llm2clip.text.truncation import TruncationCount, tokens_cut
from llm2clip.train.precision import resolve_precision, torch_dtype

log = logging.getLogger(__name__)

SETTINGS_FILE = "llm2clip_text_encoder.json"


@dataclass(frozen=True)
class EncoderSettings:
    """Everything that decides how a caption becomes a vector (saved next to the model).

    Attributes:
        pooling: ``mean`` over the pooled tokens or ``eos`` (the last real token).
        bidirectional: Turn off the causal mask of decoder LLMs (ignored for encoders).
        prompt_template: Must contain ``{text}``; may contain ``{instruction}`` before it
            (otherwise the instruction goes right before the text).
        instruction: Default instruction for :meth:`CaptionEncoder.encode` (usually empty).
        query_instruction: The instruction training queries had; pass it to ``encode`` to embed
            retrieval queries the way they were trained.
        max_length: Token budget per caption, template included (longer ones are cut). None:
            the model's own limit (:func:`llm2clip.text.loading.model_max_length`: e.g. the
            sentence-transformers ``max_seq_length``), resolved when the encoder is built.
        padding_side: ``left`` or ``right``.
        attn_implementation: ``sdpa`` or ``eager`` (flash works the same way, untested here).
        base_model: The model spec this encoder came from (provenance only).
    """

    pooling: Literal["mean", "eos"] = "mean"
    bidirectional: bool = True
    prompt_template: str = "{text}"
    instruction: str = ""
    query_instruction: str = ""
    max_length: int | None = None
    padding_side: Literal["left", "right"] = "left"
    attn_implementation: str = "sdpa"
    base_model: str = ""

    def __post_init__(self) -> None:
        if self.prompt_template.count("{text}") != 1:
            raise ValueError("prompt_template must contain '{text}' exactly once")
        if self.pooling not in ("mean", "eos") or self.padding_side not in ("left", "right"):
            raise ValueError(f"bad pooling {self.pooling!r} or padding_side {self.padding_side!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None (the model's own limit), got {self.max_length}")

    def with_model_limit(self, source: str | os.PathLike | None, config: Any = None,
                         tokenizer: Any = None) -> EncoderSettings:
        """These settings with ``max_length`` resolved: the user's value, else the model's limit.

        A user's value above the model's position limit is kept, with a warning.

        Args:
            source: The resolved local model dir (or None), read by ``model_max_length``.
            config: The loaded model config, if any.
            tokenizer: The loaded tokenizer, if any.
        """
        if self.max_length is None:
            return dataclasses.replace(self, max_length=model_max_length(source, config, tokenizer))
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and self.max_length > positions:
            log.warning("max_length %d is more than the model's %d positions", self.max_length, positions)
        return self

    def render(self, text: str, instruction: str | None = None) -> tuple[str, int]:
        """The string the model sees and the character where the caption starts."""
        instruction = self.instruction if instruction is None else instruction
        head, tail = self.prompt_template.split("{text}")
        head = head.replace("{instruction}", instruction) if "{instruction}" in head else head + instruction
        return head + text + tail, len(head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{SETTINGS_FILE}: unknown keys {unknown} (written by a newer llm2clip?)")
        return cls(**data)


def is_causal_model(model: nn.Module) -> bool:
    """True when any attention module of ``model`` runs causally (a decoder LLM)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def set_causal(model: nn.Module, causal: bool) -> int:
    """Set ``is_causal`` on every attention module that has it; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool) and module is not model:
            module.is_causal = causal
            count += 1
    return count


def bidirectional_mask(config: Any, padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask that makes a decoder attend both ways, in the format of its attention kernel.

    Args:
        config: The model config (its ``_attn_implementation`` picks the format).
        padding_mask: ``(B, L)`` 1 for real tokens, 0 for padding.
        dtype: Compute dtype (eager masks are additive floats of that dtype).

    Returns:
        ``(B, 1, L, L)`` bool (sdpa) / float (eager) mask with only padded key columns masked;
        for kernels that take a 2D mask (flash) the ``(B, L)`` padding mask itself.
    """
    from transformers.masking_utils import create_bidirectional_mask

    shape_only = torch.empty(padding_mask.shape[0], padding_mask.shape[1], 0, dtype=dtype,
                             device=padding_mask.device)
    mask = create_bidirectional_mask(config=config, inputs_embeds=shape_only,
                                     attention_mask=padding_mask, allow_is_bidirectional_skip=False)
    return padding_mask if mask is None else mask


def pool_hidden(hidden: torch.Tensor, pool_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states.

    Args:
        hidden: ``(B, L, D)`` last hidden states.
        pool_mask: ``(B, L)`` bool, the tokens that may be pooled.
        pooling: ``mean`` or ``eos`` (the last pooled token).

    Returns:
        ``(B, D)`` float32.
    """
    h = hidden.float()
    if pooling == "mean":
        m = pool_mask.unsqueeze(-1)
        # where(), not multiply: padded rows may hold NaN/inf under some kernels
        return torch.where(m, h, 0.0).sum(1) / m.sum(1).clamp(min=1)
    last = pool_mask.shape[1] - 1 - pool_mask.flip(1).int().argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), last]


class CaptionEncoder(nn.Module):
    """A text model + tokenizer + :class:`EncoderSettings`.

    ``forward`` takes what :meth:`tokenize` returns and keeps the graph (training);
    :meth:`encode` is the inference path.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, settings: EncoderSettings) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if settings.max_length is None:  # from_pretrained has resolved it already (with the model dir)
            settings = settings.with_model_limit(None, getattr(model, "config", None), tokenizer)
        self.settings = settings
        self.is_decoder = is_causal_model(model)
        if self.is_decoder and settings.bidirectional:
            set_causal(model, False)
        tokenizer.padding_side = settings.padding_side
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token  # pads are masked; the id does not matter
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        accepted = inspect.signature(base.forward).parameters
        self._takes_position_ids = "position_ids" in accepted
        self._takes_token_types = "token_type_ids" in accepted
        self.packed: PackedDecoder | None = None  # see enable_packed_inference
        self._truncation: TruncationCount | None = None  # see count_truncation

    @contextlib.contextmanager
    def count_truncation(self) -> Iterator[TruncationCount]:
        """Count what :meth:`tokenize` cuts at ``settings.max_length`` inside the block.

        Yields a fresh :class:`~llm2clip.text.truncation.TruncationCount`; an enclosing block's
        count gets the inner counts too when the inner block ends.
        """
        outer, self._truncation = self._truncation, TruncationCount()
        count = self._truncation
        try:
            yield count
        finally:
            self._truncation = outer.merge(count) if outer is not None else None

    def enable_packed_inference(self) -> bool:
        """Embed through :class:`llm2clip.text.packed.PackedDecoder` when the model allows it.

        Only for a frozen encoder: q/k/v and gate/up weights are fused and frozen (same values,
        same state_dict). Used by :func:`llm2clip.text.embed.embed_texts`; ``forward`` (training)
        and :meth:`encode` keep the ``transformers`` forward.

        Returns:
            Whether the packed path is on (False: BERT-like, causal, LoRA-wrapped, ...).
        """
        self.packed = PackedDecoder.build(self.model, self.settings.bidirectional, self.settings.max_length)
        return self.packed is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], instructions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Render, tokenize and pad a batch.

        Args:
            texts: ``B`` captions.
            instructions: Per-text instruction (None: ``settings.instruction`` for all).

        Returns:
            ``input_ids``, ``attention_mask`` (both ``(B, L)``), ``position_ids`` ``(B, L)``,
            ``pool_mask`` ``(B, L)`` bool, and ``token_type_ids`` if the tokenizer makes them.
            Rendered texts longer than ``settings.max_length`` are cut at the end; inside
            :meth:`count_truncation` they are counted.
        """
        if instructions is None:
            instructions = [self.settings.instruction] * len(texts)
        rendered = [self.settings.render(t, i) for t, i in zip(texts, instructions, strict=True)]
        enc = self.tokenizer(
            [r for r, _ in rendered], padding=True, truncation=True,
            max_length=self.settings.max_length, return_offsets_mapping=True, return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")  # (B, L, 2) character spans; special tokens (0, 0)
        mask = enc["attention_mask"].bool()
        if self._truncation is not None:
            self._truncation.add(tokens_cut(self.tokenizer, [r for r, _ in rendered], mask.sum(1).tolist(),
                                            self.settings.max_length))
        starts = torch.tensor([s for _, s in rendered]).unsqueeze(1)  # (B, 1)
        # The pooled span starts at the first token that ends inside the caption (or after it);
        # with no prefix everything is pooled, leading specials too (= sentence-transformers).
        in_text = mask & (offsets[..., 1] > starts)
        first = torch.where(in_text.any(1), in_text.int().argmax(1), 0).unsqueeze(1)
        positions = torch.arange(mask.shape[1]).unsqueeze(0)
        pool_mask = mask & ((positions >= first) | (starts == 0))
        out = dict(enc)
        out["pool_mask"] = pool_mask
        out["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
        return out

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states with this encoder's attention (bidirectional or not).

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` padding mask.
            position_ids: ``(B, L)`` positions counted from each caption's first real token.
            token_type_ids: ``(B, L)`` for BERT-like models.

        Returns:
            ``(B, L, D)`` in the model dtype; padded positions hold arbitrary values.
        """
        device = self.device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
        mask = attention_mask.to(device)
        if self.is_decoder and self.settings.bidirectional:
            dtype = self.model.get_input_embeddings().weight.dtype
            kwargs["attention_mask"] = bidirectional_mask(self.model.config, mask, dtype)
        else:
            kwargs["attention_mask"] = mask
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids.to(device)
        if token_type_ids is not None and self._takes_token_types:
            kwargs["token_type_ids"] = token_type_ids.to(device)
        return self.model(**kwargs).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Embed a tokenized batch (the output of :meth:`tokenize`), keeping the graph.

        Returns:
            ``(B, D)`` float32 embeddings (not normalised).
        """
        hidden = self.token_states(input_ids, attention_mask, position_ids, token_type_ids)  # (B, L, D)
        return pool_hidden(hidden, pool_mask.to(hidden.device), self.settings.pooling)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True,
               instruction: str | None = None, progress: bool = False) -> torch.Tensor:
        """Embed captions; sorted by length internally (less padding), returned in input order.

        Args:
            texts: ``N`` captions.
            batch_size: Captions per forward pass.
            normalize: L2-normalise the vectors.
            instruction: Instruction for every text (None: ``settings.instruction``).
            progress: Show a tqdm bar (captions/s, ETA).

        Returns:
            ``(N, D)`` float32 on CPU.
        """
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        bar = tqdm(total=len(texts), desc="encode", unit="caption", disable=not progress)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenize([texts[i] for i in idx],
                                      None if instruction is None else [instruction] * len(idx))
                emb = self(**batch).float()
                out[idx] = (F.normalize(emb, dim=-1) if normalize else emb).cpu()
                bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model (safetensors), tokenizer and settings; the model must not be a peft wrapper."""
        if hasattr(self.model, "merge_and_unload"):
            raise ValueError("merge the LoRA first (merge_and_unload) before saving")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        atomic_write_json(directory / SETTINGS_FILE, self.settings.to_dict())

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, settings: EncoderSettings | None = None, *,
                        cache_dir: str | os.PathLike = ".cache/models", dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_length: int | None = None
                        ) -> CaptionEncoder:
        """Load an encoder from a saved dir (its settings file wins) or any model spec.

        Args:
            source: Saved encoder dir, HF dir, ``.gguf`` file, ``pkg://`` resource or hub id.
            settings: Settings to use when ``source`` has no settings file (else defaults).
            cache_dir: GGUF conversion cache.
            dtype: Weights dtype; default float32 on CPU, bfloat16 on CUDA.
            device: Where to put the model; default CUDA when available.
            max_length: Override the token budget of the settings (None: theirs, and when they
                do not say, the model's own limit, e.g. MiniLM's ``max_seq_length`` 256).

        Raises:
            FileNotFoundError: ``source`` is a local path that does not exist (at once, no hub).
        """
        resolved = resolve_model(str(source), cache_dir)
        saved = Path(resolved) / SETTINGS_FILE
        if saved.is_file():
            if settings is not None:
                log.warning("%s has its own %s; the settings passed in are ignored", resolved, SETTINGS_FILE)
            settings = EncoderSettings.from_dict(json.loads(saved.read_text()))
        settings = settings or EncoderSettings()
        if max_length is not None:
            settings = dataclasses.replace(settings, max_length=max_length)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or torch_dtype(resolve_precision("auto", device))
        model = load_model(resolved, dtype=dtype, attn_implementation=settings.attn_implementation)
        tokenizer = load_tokenizer(resolved)
        settings = settings.with_model_limit(resolved, model.config, tokenizer)
        return cls(model.to(device).eval(), tokenizer, settings)
