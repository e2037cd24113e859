"""Synthetic compositional scenes: shapes x colours x sizes x counts x relations x a word.

Each picture shows ``count`` copies of shape A next to one shape B on a plain background, with a
word written in a band at the top or the bottom. It gets a short caption (``two red circles left
of a blue star``) and a dense one in different words that mentions every attribute (sizes,
background, the word). The label is A's shape class. Deterministic by seed: the same seed and
source name give the same pictures and captions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from llm2clip.config import SyntheticSource
from llm2clip.data.layout import (
    COUNT_WORDS,
    INVERSE,
    RELATIONS,
    SIDES,
    article,
    cells,
    counted,
    halves,
    place,
    plural,
)
from llm2clip.data.records import RawSample, make_key

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "pink": (240, 120, 180),
    "brown": (130, 80, 40), "black": (20, 20, 20), "white": (245, 245, 245),
}
BACKGROUNDS = {
    "gray": (128, 128, 128), "white": (255, 255, 255), "black": (0, 0, 0),
    "beige": (235, 225, 200), "light blue": (185, 215, 240),
}
WORDS = ("STOP", "GO", "CAT", "DOG", "SUN", "MOON", "TREE", "BOOK", "FISH", "RAIN", "CAKE", "BOX")
SIZE_FRACTION = {"large": 0.25, "small": 0.14}  # object side / image side


def _visible_colours(background: tuple[int, int, int]) -> list[str]:
    """Shape colours that stand out from ``background``."""
    return [name for name, rgb in COLOURS.items() if math.dist(rgb, background) > 90]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:  # DejaVu missing: PIL's built-in font still writes the word
        return ImageFont.load_default(size)


def _polygon(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if shape == "triangle":
        return [(cx, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "diamond":
        return [(cx, y), (x + s - 1, cy), (cx, y + s - 1), (x, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    # star: 10 points alternating outer and inner radius, starting at the top
    return [
        (cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + math.pi / 5 * k),
         cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + math.pi / 5 * k))
        for k in range(10)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, fill: tuple) -> None:
    """Draw one ``s``-pixel shape with its top-left corner at ``(x, y)``."""
    if shape == "circle":
        draw.ellipse((x, y, x + s - 1, y + s - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + s - 1, y + s - 1), fill=fill)
    else:
        draw.polygon(_polygon(shape, x, y, s), fill=fill)


def text_colour_name(background: str) -> str:
    """The word is white on black, black on every other background."""
    return "white" if background == "black" else "black"


def _scene(rng: random.Random) -> dict:
    """Draw the random choices of one scene (the order of draws is part of determinism)."""
    background = rng.choice(sorted(BACKGROUNDS))
    colours = _visible_colours(BACKGROUNDS[background])
    a_shape, a_colour = rng.choice(SHAPES), rng.choice(colours)
    b_shape, b_colour = rng.choice(SHAPES), rng.choice(colours)
    while (b_shape, b_colour) == (a_shape, a_colour):
        b_shape, b_colour = rng.choice(SHAPES), rng.choice(colours)
    return {
        "background": background, "count": rng.randint(1, 3), "relation": rng.choice(RELATIONS),
        "a_shape": a_shape, "a_colour": a_colour, "a_size": rng.choice(sorted(SIZE_FRACTION)),
        "b_shape": b_shape, "b_colour": b_colour, "b_size": rng.choice(sorted(SIZE_FRACTION)),
        "word": rng.choice(WORDS), "word_at": rng.choice(("top", "bottom")),
        "template": rng.randrange(3),
    }


def render(scene: dict, size: int, rng: random.Random) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB picture."""
    bg = BACKGROUNDS[scene["background"]]
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    band = round(size * 0.2)
    text_colour = COLOURS[text_colour_name(scene["background"])]
    if scene["word_at"] == "top":
        region, band_box = (0, band, size, size), (0, 0, size, band)
    else:
        region, band_box = (0, 0, size, size - band), (0, size - band, size, size)
    a_box, b_box = halves(scene["relation"], region)
    a_side = max(2, round(size * SIZE_FRACTION[scene["a_size"]]))
    for cell in cells(a_box, scene["count"]):
        draw_shape(draw, scene["a_shape"], *place(cell, a_side, rng), a_side, COLOURS[scene["a_colour"]])
    b_side = max(2, round(size * SIZE_FRACTION[scene["b_size"]]))
    draw_shape(draw, scene["b_shape"], *place(b_box, b_side, rng), b_side, COLOURS[scene["b_colour"]])
    font = _font(max(6, round(band * 0.7)))
    cx, cy = (band_box[0] + band_box[2]) / 2, (band_box[1] + band_box[3]) / 2
    draw.text((cx, cy), scene["word"], font=font, fill=text_colour, anchor="mm")
    return im


def captions(scene: dict) -> dict[str, str]:
    """A short and a dense caption of the same scene, in different words."""
    n, rel = scene["count"], scene["relation"]
    a_name = f"{scene['a_colour']} {scene['a_shape']}"
    b_name = f"{scene['b_colour']} {scene['b_shape']}"
    short = f"{counted(n, a_name)} {rel} {article(b_name)} {b_name}"
    a_full = counted(n, f"{scene['a_size']} {a_name}")
    b_full = f"{article(scene['b_size'])} {scene['b_size']} {b_name}"
    a_side, b_side = SIDES[rel]
    text = text_colour_name(scene["background"])
    a_group = f"a group of {COUNT_WORDS[n]} {plural(scene['a_size'] + ' ' + a_name)}" if n > 1 else a_full
    bg, word, at = scene["background"], scene["word"], scene["word_at"]
    dense = [
        f"{article(bg)} {bg} background with {a_full} {a_side} and {b_full} {b_side}; "
        f"the word {word} is written in {text} at the {at}",
        f"on {article(bg)} {bg} background, {b_full} sits {INVERSE[rel]} {a_group}; "
        f"{text} letters at the {at} spell {word}",
        f"a picture showing {a_full} {a_side}, {b_full} {b_side}, {article(bg)} {bg} background "
        f"and the text \"{word}\" in {text} along the {at}",
    ][scene["template"]]
    return {"short": short, "dense": dense}


def iter_synthetic(src: SyntheticSource, seed: int, caption_fields: tuple[str, ...]) -> Iterator[RawSample]:
    """Yield ``src.count`` scenes; the first two caption fields get the short / dense caption.

    Further caption fields (if ``common.caption_fields`` names more than two) get the dense one.
    """
    rng = random.Random(f"{seed}/{src.name}")
    for i in range(src.count):
        scene = _scene(rng)
        image = render(scene, src.image_size, rng)
        caps = captions(scene)
        texts = [caps["short"], caps["dense"]] + [caps["dense"]] * max(0, len(caption_fields) - 2)
        yield RawSample(
            source=src.name, source_id=f"seed{seed}/{i:06d}", key=make_key(src.name, f"{i:06d}"),
            image=image, captions=dict(zip(caption_fields, texts, strict=False)),
            label=scene["a_shape"],
        )
