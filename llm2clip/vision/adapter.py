"""The text adapter: frozen-LLM caption embedding ``(N, d_llm)`` -> CLIP space ``(N, embed_dim)``.

A copy of the reference ``TextProj`` (LLM2CLIP ``eva_clip/model.py``; paper: "inverted bottleneck
MLP as in FuseMix"): L2-normalise the input, then ``num_blocks`` pre-LayerNorm residual MLP blocks
``y = x + W2 GELU(W1 LN(x))`` (d -> 2d -> d, exact GELU, no dropout), a final LayerNorm and a
biased Linear to ``embed_dim``. PyTorch default init, as the reference.

Module names follow the reference (``text_adaptor.<i>.fn.{0,3}``, ``.ln``) so its released adapter
weights (``text.text_adaptor.*``) map onto ours by dropping the ``text.`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearBlock(nn.Module):
    """Pre-LN residual MLP block: ``x + fn(ln(x))`` with ``fn = Linear(d, e*d), GELU, Linear(e*d, d)``.

    The reference keeps a ``Dropout(0)`` between GELU and the second Linear; it is an identity, kept
    here only so parameter names (``fn.0``, ``fn.3``) match the reference's.
    """

    def __init__(self, dim: int, expansion: float = 2.0) -> None:
        super().__init__()
        hidden = int(expansion * dim)
        self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` -> ``(N, d)``."""
        return x + self.fn(self.ln(x))


class TextAdapter(nn.Module):
    """L2-normalised LLM embedding -> residual MLP stack -> LayerNorm -> Linear(d, embed_dim).

    Args:
        llm_dim: Width ``d`` of the LLM caption embeddings (4096 for Llama-3-8B).
        embed_dim: Width of the shared CLIP space (1280 in every LLM2CLIP config).
        num_blocks: Residual blocks (reference: 4).
        expansion: Hidden width factor of each block (reference: 2).
    """

    def __init__(self, llm_dim: int, embed_dim: int, num_blocks: int = 4, expansion: float = 2.0) -> None:
        super().__init__()
        if llm_dim < 1 or embed_dim < 1 or num_blocks < 0 or expansion <= 0:
            raise ValueError(f"bad adapter dims: llm_dim={llm_dim} embed_dim={embed_dim} "
                             f"num_blocks={num_blocks} expansion={expansion}")
        self.llm_dim = llm_dim
        self.embed_dim = embed_dim
        self.num_blocks = num_blocks
        self.expansion = expansion
        self.text_adaptor = nn.Sequential(
            *[LinearBlock(llm_dim, expansion) for _ in range(num_blocks)],
            nn.LayerNorm(llm_dim),
            nn.Linear(llm_dim, embed_dim, bias=True),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map caption embeddings into the CLIP space (not normalised; the model normalises).

        Args:
            embeddings: ``(N, llm_dim)`` in any float dtype (sidecars may hold fp16).

        Returns:
            ``(N, embed_dim)`` in the adapter's parameter dtype.
        """
        if embeddings.shape[-1] != self.llm_dim:
            raise ValueError(f"text embeddings have dim {embeddings.shape[-1]}, the adapter expects "
                             f"{self.llm_dim}")
        # Normalise in fp32: squaring 4096 fp16/bf16 values loses precision (research §7.2).
        x = F.normalize(embeddings.float(), p=2, dim=-1)
        dtype = self.text_adaptor[-1].weight.dtype
        return self.text_adaptor(x.to(dtype))

    @staticmethod
    def num_parameters(llm_dim: int, embed_dim: int, num_blocks: int = 4, expansion: float = 2.0) -> int:
        """Closed-form parameter count (273,769,728 for 4096 -> 1280; 4 blocks at 2048: 67.1M)."""
        hidden = int(expansion * llm_dim)
        block = 2 * llm_dim + (llm_dim * hidden + hidden) + (hidden * llm_dim + llm_dim)
        return num_blocks * block + 2 * llm_dim + llm_dim * embed_dim + embed_dim
