"""Image transforms for the vision tower, with PIL and numpy only (torchvision breaks our torch pin).

They follow the reference (LLM2CLIP ``eva_clip/transform.py``): train is
``RandomResizedCrop(size, scale=(0.9, 1.0), bicubic)`` -> RGB -> [0, 1] -> normalise; eval is
``Resize(size, bicubic)`` on the shorter side -> ``CenterCrop(size)`` -> normalise. No other
augmentation. The crop-box sampling copies torchvision's ``RandomResizedCrop.get_params``, so the
same random numbers give the same box.

Randomness only comes from the generator passed in (``random.Random`` or
``numpy.random.Generator``), so a seeded loader worker gives the same crops every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# OpenAI CLIP statistics (used by the reference for every tower it trains).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP and the TF-converted EfficientNet-Lite expect inputs in [-1, 1].
HALF = (0.5, 0.5, 0.5)

Rng = random.Random | np.random.Generator


@dataclass(frozen=True)
class Preprocess:
    """What a tower expects as input.

    Attributes:
        image_size: Side of the square input in pixels.
        mean: Per-channel mean subtracted from [0, 1] RGB values.
        std: Per-channel std the result is divided by.
    """

    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values and std > 0, got {self.mean} / {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; also records the fixed parts of the recipe for readers of the config."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": "bicubic", "eval_resize": "shorter_side", "eval_crop": "center"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparent pixels are composited onto white (``convert("RGB")`` would expose whatever colour
    the transparent pixels happen to store, often black). 16/32-bit greyscale is rescaled to 8 bit
    rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return image.convert("RGB")


def _uniform(rng: Rng, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _randint(rng: Rng, low: int, high: int) -> int:
    """Inclusive on both ends, like ``random.randint``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def random_resized_crop_box(width: int, height: int, rng: Rng, scale: tuple[float, float] = (0.9, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Sample a crop box as torchvision's ``RandomResizedCrop.get_params`` does.

    Args:
        width: Image width.
        height: Image height.
        rng: Source of randomness.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (w / h), sampled log-uniformly.

    Returns:
        ``(left, top, crop_width, crop_height)``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(rng, 0, width - w), _randint(rng, 0, height - h), w, h
    # Fallback: the largest central crop whose aspect ratio is inside ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalize_array(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """RGB PIL image -> ``(3, H, W)`` float32, ``(x / 255 - mean) / std``."""
    arr = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class TrainTransform:
    """``RandomResizedCrop`` (bicubic) to ``image_size`` + normalise; picklable for loader workers.

    Attributes:
        pre: The tower's preprocessing spec.
        scale: Crop area range (reference: ``(0.9, 1.0)``).
        ratio: Crop aspect-ratio range.
    """

    pre: Preprocess
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, rng: Rng) -> np.ndarray:
        """Returns ``(3, image_size, image_size)`` float32."""
        image = to_rgb(image)
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        size = self.pre.image_size
        # Crop + resize in one resampling pass (PIL's ``box``), as torchvision's resized_crop does.
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return normalize_array(image, self.pre)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``image_size`` (bicubic), center crop, normalise."""

    pre: Preprocess

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Returns ``(3, image_size, image_size)`` float32."""
        image = to_rgb(image)
        size = self.pre.image_size
        w, h = image.size
        # torchvision Resize(int): the shorter side becomes ``size``, the other keeps the aspect.
        if w <= h:
            new_w, new_h = size, max(size, int(size * h / w))
        else:
            new_w, new_h = max(size, int(size * w / h)), size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        return normalize_array(image, self.pre)


def to_tensor_batch(arrays: list[np.ndarray]):
    """Stack ``B`` arrays of shape ``(3, H, W)`` into a float32 tensor ``(B, 3, H, W)``."""
    import torch

    if not arrays:
        raise ValueError("to_tensor_batch needs at least one array")
    return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))
