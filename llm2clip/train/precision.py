"""Which floating-point precision a trainer runs in: one resolver for every trainer."""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in, from the config value and the device.

    ``auto``: bf16 on a CUDA device that supports it, fp16 (with DeepSpeed's dynamic loss
    scaling) on an older CUDA device, fp32 on CPU. An explicit value is checked against the
    device.

    Raises:
        ValueError: ``fp16`` on CPU (DeepSpeed's CPU accelerator has no fp16 training path), or
            ``bf16`` on a CUDA device without bf16; the message says what to use instead.
    """
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if bf16_ok else "fp16"
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and not bf16_ok:
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of activations and low-precision weights for a resolved precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
