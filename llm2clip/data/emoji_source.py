"""Emoji scenes: Noto Color Emoji glyphs composed into small scenes, named by CLDR names.

A scene shows ``count`` copies of emoji A next to one emoji B (``three red apples above a dog
face``). The names are the human-written Unicode CLDR names from the ``emoji`` package. The
short caption is the plain phrase; the dense caption describes the same picture in other words
(background colour, the inverse relation, "emoji" spelled out). The label is A's name.

Skin-tone variants are skipped, and so is every emoji that renders blank or as several glyphs
(a sequence the font has no single glyph for). Deterministic by seed.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw, ImageFont

from llm2clip.config import EmojiSource
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
)
from llm2clip.data.records import RawSample, make_key

log = logging.getLogger(__name__)

GLYPH_SIZE = 109  # CBDT bitmap font: this is the only size it has
BACKGROUNDS = {
    "white": (255, 255, 255), "light gray": (225, 225, 225), "light yellow": (250, 240, 190),
    "light blue": (200, 225, 245), "light green": (210, 240, 210), "pale pink": (250, 220, 230),
}
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_REGIONAL = range(0x1F1E6, 0x1F200)


def font_problem(font_path: str) -> str | None:
    """Why the emoji source cannot run here (None when it can)."""
    try:
        import emoji  # noqa: F401
    except ImportError:
        return "the 'emoji' Python package is not installed (pip install emoji)"
    if not os.path.isfile(font_path):
        return (
            f"emoji font {font_path} not found: install the Debian package fonts-noto-color-emoji "
            "(apt-get install fonts-noto-color-emoji) or set font_path"
        )
    try:
        ImageFont.truetype(font_path, GLYPH_SIZE)
    except OSError as err:
        return f"cannot load emoji font {font_path} at size {GLYPH_SIZE}: {err}"
    return None


def candidates() -> list[tuple[str, str]]:
    """Fully-qualified emoji without skin tones, as ``(emoji, name)``, in a fixed order."""
    import emoji

    out = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"] or _SKIN_TONES.intersection(char):
            continue
        name = data["en"].strip(":").replace("_", " ").strip()
        if ord(char[0]) in _REGIONAL or char.startswith("\U0001f3f4\U000e0067"):
            name = name if name.lower().startswith("flag") else f"flag of {name}"
        out.append((char, name))
    return sorted(out)


class GlyphCache:
    """Renders each emoji once (cropped RGBA), remembers which ones are unusable."""

    def __init__(self, font_path: str) -> None:
        self.font = ImageFont.truetype(font_path, GLYPH_SIZE)
        self._glyphs: dict[str, Image.Image | None] = {}
        self._scaled: dict[tuple[str, int], Image.Image] = {}

    def glyph(self, char: str) -> Image.Image | None:
        """The cropped glyph, or None if it renders blank or as more than one glyph."""
        if char not in self._glyphs:
            canvas = Image.new("RGBA", (GLYPH_SIZE * 4, GLYPH_SIZE + 40), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), char, font=self.font, embedded_color=True)
            box = canvas.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
            usable = box is not None and box[2] - box[0] <= GLYPH_SIZE * 1.3
            self._glyphs[char] = canvas.crop(box) if usable else None
        return self._glyphs[char]

    def scaled(self, char: str, side: int) -> Image.Image:
        """The glyph fitted into a ``side`` x ``side`` square (aspect kept)."""
        if (char, side) not in self._scaled:
            g = self.glyph(char)
            assert g is not None
            scale = side / max(g.size)
            size = (max(1, round(g.width * scale)), max(1, round(g.height * scale)))
            self._scaled[(char, side)] = g.resize(size, Image.Resampling.LANCZOS)
        return self._scaled[(char, side)]


def _paste(canvas: Image.Image, glyph: Image.Image, xy: tuple[int, int], side: int) -> None:
    x, y = xy
    offset = ((side - glyph.width) // 2, (side - glyph.height) // 2)
    canvas.paste(glyph, (x + offset[0], y + offset[1]), glyph)


def render(scene: dict, size: int, glyphs: GlyphCache, rng: random.Random) -> Image.Image:
    """Draw ``scene`` on a ``size`` x ``size`` picture."""
    im = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    margin = max(1, size // 32)
    a_box, b_box = halves(scene["relation"], (margin, margin, size - margin, size - margin))
    a_cells = cells(a_box, scene["count"])
    a_side = min(min(c[2] - c[0], c[3] - c[1]) for c in a_cells) * 9 // 10
    for cell in a_cells:
        _paste(im, glyphs.scaled(scene["a"], a_side), place(cell, a_side, rng), a_side)
    b_side = min(b_box[2] - b_box[0], b_box[3] - b_box[1]) * 8 // 10
    _paste(im, glyphs.scaled(scene["b"], b_side), place(b_box, b_side, rng), b_side)
    return im


def captions(scene: dict) -> dict[str, str]:
    """A short and a dense caption of the same emoji scene."""
    n, rel, bg = scene["count"], scene["relation"], scene["background"]
    a, b = scene["a_name"], scene["b_name"]
    short = f"{counted(n, a)} {rel} {article(b)} {b}"
    copies = f"{COUNT_WORDS[n]} {a} emoji" if n > 1 else f"a single {a} emoji"
    a_side, b_side = SIDES[rel]
    dense = [
        f"{article(bg)} {bg} picture with {copies} {a_side} and one {b} emoji {b_side}",
        f"on {article(bg)} {bg} background, {article(b)} {b} emoji is placed {INVERSE[rel]} {copies}",
        f"emoji drawing: {copies} {a_side}, {article(b)} {b} {b_side}, over a plain {bg} background",
    ][scene["template"]]
    return {"short": short, "dense": dense}


def _pick(pool: list[tuple[str, str]], glyphs: GlyphCache, rng: random.Random, avoid: str) -> tuple[str, str]:
    """A random renderable emoji other than ``avoid`` (``avoid`` itself if there is none)."""
    for _ in range(10 * len(pool)):
        char, name = rng.choice(pool)
        if char != avoid and glyphs.glyph(char) is not None:
            return char, name
    return next((c, n) for c, n in pool if c == avoid)


def iter_emoji(src: EmojiSource, seed: int, caption_fields: tuple[str, ...]) -> Iterator[RawSample]:
    """Yield emoji scenes (``src.count``; 0 = one scene per renderable emoji).

    Nothing is yielded (with a WARNING) when the font or the ``emoji`` package is missing.
    """
    problem = font_problem(src.font_path)
    if problem:
        log.warning("source %r skipped: %s", src.name, problem)
        return
    rng = random.Random(f"{seed}/{src.name}")
    glyphs = GlyphCache(src.font_path)
    pool = candidates()
    order = pool[:]
    rng.shuffle(order)
    if src.count == 0:
        order = [c for c in order if glyphs.glyph(c[0]) is not None]
    total = src.count or len(order)
    made = misses = 0
    for char, name in itertools.cycle(order):
        if made >= total or misses > len(order):
            return
        if glyphs.glyph(char) is None:
            misses += 1
            continue
        misses = 0
        b_char, b_name = _pick(pool, glyphs, rng, avoid=char)
        scene = {
            "a": char, "a_name": name, "b": b_char, "b_name": b_name, "count": rng.randint(1, 3),
            "relation": rng.choice(RELATIONS), "background": rng.choice(sorted(BACKGROUNDS)),
            "template": rng.randrange(3),
        }
        caps = captions(scene)
        texts = [caps["short"], caps["dense"]] + [caps["dense"]] * max(0, len(caption_fields) - 2)
        codes = "_".join(f"{ord(c):X}" for c in char)
        yield RawSample(
            source=src.name, source_id=f"seed{seed}/{made:06d}/U+{codes}",
            key=make_key(src.name, f"{made:06d}"), image=render(scene, src.image_size, glyphs, rng),
            captions=dict(zip(caption_fields, texts, strict=False)), label=name,
        )
        made += 1
