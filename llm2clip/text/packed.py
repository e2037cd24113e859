"""Padding-free inference for Llama-family caption encoders (what embed_captions runs).

``transformers`` runs a decoder on a padded ``(B, L)`` batch: every linear layer also computes the
padded positions, and each step (norms, rotary, residual adds) is its own pass over memory. For
offline embedding with bidirectional attention almost all of the work is linear layers, so this
module runs the same weights the way embedding servers do:

- **packed tokens**: the real tokens of a batch are one ``(T, D)`` matrix, so every GEMM computes
  exactly the real tokens (no padding) and has ``M = T``, big enough to run near the matmul peak;
- **fused GEMMs**: q/k/v are one GEMM, gate/up another (k/v alone have tiny ``N``); the model's own
  ``nn.Linear`` weights become views of the fused matrices, so no weight is stored twice and the
  ``transformers`` forward keeps working on the same model;
- **residual adds inside the GEMM** (``addmm`` with ``beta=1``) and fused RMSNorm (fp32);
- attention alone is padded: q/k/v of each caption are scattered into a ``(B, L)`` layout once
  per layer (pad slots stay zero) and run through SDPA with padded keys masked.

The math is the model's own: its embedding, rotary module (any rope type it supports), norms'
weights and epsilon, activation and attention scaling. Vectors equal the ``transformers``
forward with :func:`llm2clip.text.encoder.bidirectional_mask` (tested on tiny Llama, Mistral and
Qwen2 models), so the two paths can be mixed freely. Anything else (BERT-like encoders, causal
attention, LoRA wrappers, other layer types) returns ``None`` from :meth:`PackedDecoder.build`
and runs through ``transformers``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Decoder layers whose forward is exactly: x += o(attn(rope(qkv(norm1(x))))); x += mlp(norm2(x)).
SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One frozen weight (and bias) for linears that read the same input.

    The linears' own parameters become views of it (same values, no second copy in memory), so
    the ``transformers`` forward of the model still works and its ``state_dict`` is unchanged.
    """
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = slice(start, start + lin.out_features)
        lin.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[rows], requires_grad=False)
        start += lin.out_features
    return weight, bias


class _Layer:
    """The weights of one decoder layer, fused for packed inference."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv, self.qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up, self.gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
        self.o, self.o_bias = attn.o_proj.weight.detach(), attn.o_proj.bias
        self.down, self.down_bias = mlp.down_proj.weight.detach(), mlp.down_proj.bias
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.act = mlp.act_fn
        self.scaling = float(attn.scaling)
        self.intermediate = mlp.gate_proj.out_features


class PackedDecoder:
    """Padding-free, inference-only forward of a Llama-family decoder with bidirectional attention.

    Build it with :meth:`build`; call it with the real tokens of a batch, caption after caption.
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.model = model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = [_Layer(layer) for layer in model.layers[: config.num_hidden_layers]]

    @classmethod
    def build(cls, model: nn.Module, bidirectional: bool, max_length: int) -> PackedDecoder | None:
        """The packed forward of ``model``, or ``None`` (with the reason logged) if unsupported.

        Args:
            model: An ``AutoModel`` backbone (``LlamaModel`` etc., not a LoRA wrapper); its
                q/k/v and gate/up weights become views of fused matrices (same values).
            bidirectional: The encoder's attention; causal encoders are not packed.
            max_length: Longest caption in tokens (a sliding window shorter than it is refused).
        """
        reason = cls._unsupported(model, bidirectional, max_length)
        if reason:
            log.info("packed inference off (%s); using the transformers forward", reason)
            return None
        log.info("packed inference on: %s, %d layers", type(model).__name__, model.config.num_hidden_layers)
        return cls(model)

    @staticmethod
    def _unsupported(model: nn.Module, bidirectional: bool, max_length: int) -> str:
        if hasattr(model, "peft_config"):
            return "a LoRA/peft wrapper: merge it first"
        layers = getattr(model, "layers", None)
        if layers is None or not hasattr(model, "rotary_emb") or not hasattr(model, "embed_tokens"):
            return f"{type(model).__name__} is not a Llama-family backbone"
        names = {type(layer).__name__ for layer in layers}
        if not names <= SUPPORTED_LAYERS:
            return f"layer type {sorted(names - SUPPORTED_LAYERS)} not in {sorted(SUPPORTED_LAYERS)}"
        if not bidirectional:
            return "causal attention"
        config = model.config
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and window < max_length:
            return f"sliding-window attention ({window} < max_length {max_length})"
        return ""

    def embed(self, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
        """Pooled vectors of a padded batch (:meth:`CaptionEncoder.tokenize` output).

        Returns:
            ``(B, D)`` float32, equal to ``CaptionEncoder.forward`` on the same batch.
        """
        real = batch["attention_mask"].bool()
        lengths = real.sum(1)
        device = self.model.embed_tokens.weight.device
        hidden = self(batch["input_ids"][real].to(device), batch["position_ids"][real].to(device), lengths)
        return pool_packed(hidden, batch["pool_mask"][real].to(device), lengths.to(device), pooling)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op instead of five; same formula as the module
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        return norm(x)  # lower precision: the module's own rounding order

    @staticmethod
    def _add_linear(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """``x + a @ weight.T (+ bias)`` with the add inside the GEMM."""
        out = torch.addmm(x, a, weight.t())
        return out if bias is None else out.add_(bias)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
        """Last hidden states (after the final norm) of the real tokens.

        Args:
            input_ids: ``(T,)`` the real tokens of ``B`` captions, caption after caption.
            positions: ``(T,)`` position of each token within its caption (0, 1, ...).
            lengths: ``(B,)`` tokens per caption (sums to ``T``).

        Returns:
            ``(T, D)`` in the model dtype.
        """
        model = self.model
        x = model.embed_tokens(input_ids)  # (T, D)
        cos, sin = model.rotary_emb(x, positions.unsqueeze(0))  # (1, T, hd) each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, hd)
        attend = _Attention(lengths, self.heads, self.kv_heads, self.head_dim, x)
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        for layer in self.layers:
            qkv = F.linear(self._norm(layer.norm1, x), layer.qkv, layer.qkv_bias)  # (T, (H + 2KV) hd)
            qk = qkv[:, :qk_width].unflatten(1, (-1, self.head_dim))  # (T, H + KV, hd), a view
            qkv[:, :qk_width] = (qk * cos).addcmul_(_rotate_half(qk), sin).flatten(1)  # rotary
            x = self._add_linear(x, attend(qkv, layer.scaling), layer.o, layer.o_bias)
            gate_up = F.linear(self._norm(layer.norm2, x), layer.gate_up, layer.gate_up_bias)
            gate, up = gate_up.split(layer.intermediate, dim=-1)
            x = self._add_linear(x, layer.act(gate).mul_(up), layer.down, layer.down_bias)
        return model.norm(x)


def pool_packed(hidden: torch.Tensor, pool: torch.Tensor, lengths: torch.Tensor,
                pooling: str) -> torch.Tensor:
    """:func:`llm2clip.text.encoder.pool_hidden` for packed tokens.

    Args:
        hidden: ``(T, D)`` token states, caption after caption.
        pool: ``(T,)`` bool, the tokens that may be pooled (at least one per caption).
        lengths: ``(B,)`` tokens per caption.
        pooling: ``mean`` or ``eos`` (the last pooled token).

    Returns:
        ``(B, D)`` float32.
    """
    caption = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)[pool]
    if pooling == "mean":
        sums = hidden.new_zeros(len(lengths), hidden.shape[1], dtype=torch.float32)
        sums.index_add_(0, caption, hidden[pool].float())
        return sums / torch.bincount(caption, minlength=len(lengths)).clamp(min=1).unsqueeze(1)
    token = torch.arange(len(pool), device=hidden.device)[pool]
    last = torch.zeros(len(lengths), dtype=torch.long, device=hidden.device)
    last.scatter_reduce_(0, caption, token, reduce="amax", include_self=False)
    return hidden[last].float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention:
    """Bidirectional attention over packed captions: scatter to ``(B, L)``, SDPA, gather back."""

    def __init__(self, lengths: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 like: torch.Tensor) -> None:
        self.batch, self.longest = len(lengths), int(lengths.max())
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        total = int(lengths.sum())
        self.padded = total < self.batch * self.longest
        if self.padded:
            device = like.device
            starts = torch.cumsum(lengths, 0) - lengths  # first packed token of each caption
            caption = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths.to(device))
            offset = torch.arange(total, device=device) - starts.to(device)[caption]
            self.slots = caption * self.longest + offset  # (T,) row of each token in (B * L)
            keys = torch.arange(self.longest, device=device) < lengths.to(device).unsqueeze(1)
            self.mask = keys[:, None, None, :]  # (B, 1, 1, L): padded keys masked
            # pad slots are never written, so they stay zero (finite keys under the mask)
            width = (heads + 2 * kv_heads) * head_dim
            self.buffer = like.new_zeros(self.batch * self.longest, width)

    def __call__(self, qkv: torch.Tensor, scaling: float) -> torch.Tensor:
        """``(T, H hd)`` attention output for packed ``qkv`` ``(T, (H + 2 KV) hd)``."""
        b, n, hd = self.batch, self.longest, self.head_dim
        if self.padded:
            self.buffer[self.slots] = qkv
            rows, mask = self.buffer, self.mask
        else:
            rows, mask = qkv, None
        q, k, v = rows.view(b, n, -1, hd).split((self.heads, self.kv_heads, self.kv_heads), dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scaling,
                                             enable_gqa=self.heads != self.kv_heads)  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(b * n, self.heads * hd)
        return out[self.slots] if self.padded else out
