"""PIL/numpy transforms: shapes, normalisation, crop ranges, determinism, odd image modes."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.vision.transforms import (
    HALF,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EvalTransform,
    Preprocess,
    TrainTransform,
    random_resized_crop_box,
    to_rgb,
    to_tensor_batch,
)

PRE = Preprocess(32)


def gradient_image(w: int = 120, h: int = 90) -> Image.Image:
    """Every pixel different, so any change of crop changes the output."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def expected_pixel(rgb, pre=PRE) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255 - np.asarray(pre.mean)) / np.asarray(pre.std)


@pytest.mark.parametrize("size", [(200, 150), (150, 200), (20, 10), (32, 32), (1000, 40)])
def test_output_shapes(size):
    image = gradient_image(*size)
    assert EvalTransform(PRE)(image).shape == (3, 32, 32)
    out = TrainTransform(PRE)(image, random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("pre", [PRE, Preprocess(24, HALF, HALF)])
def test_normalisation_of_a_solid_colour(pre):
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    want = expected_pixel((200, 30, 90), pre)
    for out in (EvalTransform(pre)(image), TrainTransform(pre)(image, np.random.default_rng(0))):
        for c in range(3):
            np.testing.assert_allclose(out[c], want[c], atol=1e-5)
    assert PRE.mean == OPENAI_CLIP_MEAN and PRE.std == OPENAI_CLIP_STD


def test_eval_resizes_shorter_side_and_center_crops():
    # 200 x 100: left 50 px red, middle 100 px green, right 50 px blue -> resized to 64 x 32, the
    # central 32 px (the green band) survive the crop
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50, 0] = 255
    arr[:, 50:150, 1] = 255
    arr[:, 150:, 2] = 255
    out = EvalTransform(PRE)(Image.fromarray(arr))
    np.testing.assert_allclose(out[:, :, 2:30], np.broadcast_to(expected_pixel((0, 255, 0))[:, None, None],
                                                                (3, 32, 28)), atol=1e-5)


def test_crop_boxes_respect_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(400, 300, rng)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        area = w * h / (400 * 300)
        assert 0.9 - 0.01 <= area <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_crop_box_covers_the_sampled_range():
    rng = np.random.default_rng(0)
    areas = [w * h / 160_000 for _, _, w, h in (random_resized_crop_box(400, 400, rng) for _ in range(500))]
    assert min(areas) < 0.91 and max(areas) > 0.98


def test_crop_box_fallback_for_extreme_aspect():
    # no crop of >= 90% of a 1000 x 10 image has an aspect ratio <= 4/3: central crop at ratio 4/3
    left, top, w, h = random_resized_crop_box(1000, 10, random.Random(0))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2 and top == 0


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_train_transform_is_deterministic_given_the_generator(make_rng):
    image = gradient_image()
    transform = TrainTransform(PRE)
    a = [transform(image, rng) for rng in [make_rng(7)] for _ in range(3)]
    b = [transform(image, rng) for rng in [make_rng(7)] for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    c = transform(image, make_rng(8))
    assert not np.array_equal(a[0], c)
    assert not np.array_equal(a[0], a[1])  # the generator advances


def test_eval_transform_is_deterministic():
    image = gradient_image()
    assert np.array_equal(EvalTransform(PRE)(image), EvalTransform(PRE)(image))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_non_rgb_modes(mode):
    image = gradient_image(40, 30).convert(mode)
    out = EvalTransform(PRE)(image)
    assert out.shape == (3, 32, 32) and np.isfinite(out).all()
    assert to_rgb(image).mode == "RGB"


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    out = EvalTransform(PRE)(image)
    np.testing.assert_allclose(out[:, 5, 5], expected_pixel((255, 255, 255)), atol=1e-5)
    palette = Image.new("P", (40, 40), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    image = Image.fromarray(np.full((20, 20), 32768, np.uint16))  # what 16-bit PNGs decode to
    assert image.mode == "I;16"
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_to_tensor_batch():
    arrays = [TrainTransform(PRE)(gradient_image(), random.Random(i)) for i in range(4)]
    batch = to_tensor_batch(arrays)
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert np.array_equal(batch[2].numpy(), arrays[2])
    with pytest.raises(ValueError):
        to_tensor_batch([])


def test_preprocess_validation_and_round_trip():
    with pytest.raises(ValueError):
        Preprocess(0)
    with pytest.raises(ValueError):
        Preprocess(32, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError):
        Preprocess(32, HALF, (0.5, 0.0, 0.5))
    pre = Preprocess(224, HALF, HALF)
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_fast_enough():
    # numpy/PIL only, no per-pixel Python: 40 train crops of a 640 x 480 photo to 224 px
    image = gradient_image(640, 480)
    transform = TrainTransform(Preprocess(224))
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(40):
        transform(image, rng)
    per_image = (time.perf_counter() - start) / 40
    assert per_image < 0.1, f"{per_image * 1000:.1f} ms per image"
    assert math.isfinite(per_image)
