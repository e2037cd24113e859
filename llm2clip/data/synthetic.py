"""Synthetic compositional scenes: shapes x colours x sizes x counts x relations x a word.

Each picture shows ``count`` copies of shape A next to one shape B on a plain background, with a
word written in a band at the top or the bottom. The label is A's shape class. Captions come in
styles (see :data:`CAPTION_STYLES`; ``SyntheticSource.captions`` picks them per caption field):

- ``short``: ``two red circles left of a blue star``;
- ``dense``: one sentence in other words that mentions every attribute (sizes, background, word);
- ``long``: a paragraph of several sentences (ShareGPT4V / DOCCI style) with every attribute;
- ``de`` / ``fr``: the short caption in German / French (eval-only, for cross-lingual retrieval).

Deterministic by seed: the same seed and source name give the same pictures and captions. Every
style is a pure function of the scene's attributes, so adding styles never changes the random
stream that draws the scenes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from llm2clip.config import SyntheticSource
from llm2clip.config.prepare_data import SYNTHETIC_CAPTION_STYLES
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
from llm2clip.io import StageError

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


def class_scene(shape: str, rng: random.Random) -> dict:
    """A random scene whose group A is ``shape`` and whose object B is another shape.

    For labelled-image sets (``llm2clip.data.demo_folder``): only the labelled shape class is in
    the picture, so zero-shot classification of it is unambiguous.
    """
    scene = _scene(rng)
    return {**scene, "a_shape": shape, "b_shape": rng.choice([s for s in SHAPES if s != shape])}


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


# --------------------------------------------------------------------------- English captions


def short_caption(scene: dict) -> str:
    """``two red circles left of a blue star``: count, colours, shapes and the relation."""
    a_name = f"{scene['a_colour']} {scene['a_shape']}"
    b_name = f"{scene['b_colour']} {scene['b_shape']}"
    return f"{counted(scene['count'], a_name)} {scene['relation']} {article(b_name)} {b_name}"


def dense_caption(scene: dict) -> str:
    """One sentence in other words than the short caption, with every attribute of the scene."""
    n, rel = scene["count"], scene["relation"]
    a_name = f"{scene['a_colour']} {scene['a_shape']}"
    b_name = f"{scene['b_colour']} {scene['b_shape']}"
    a_full = counted(n, f"{scene['a_size']} {a_name}")
    b_full = f"{article(scene['b_size'])} {scene['b_size']} {b_name}"
    a_side, b_side = SIDES[rel]
    text = text_colour_name(scene["background"])
    a_group = f"a group of {COUNT_WORDS[n]} {plural(scene['a_size'] + ' ' + a_name)}" if n > 1 else a_full
    bg, word, at = scene["background"], scene["word"], scene["word_at"]
    return [
        f"{article(bg)} {bg} background with {a_full} {a_side} and {b_full} {b_side}; "
        f"the word {word} is written in {text} at the {at}",
        f"on {article(bg)} {bg} background, {b_full} sits {INVERSE[rel]} {a_group}; "
        f"{text} letters at the {at} spell {word}",
        f"a picture showing {a_full} {a_side}, {b_full} {b_side}, {article(bg)} {bg} background "
        f"and the text \"{word}\" in {text} along the {at}",
    ][scene["template"]]


# Which part of the picture group A / object B fill, and the relation as a long caption says it.
_PARTS = {"left of": ("left", "right"), "right of": ("right", "left"),
          "above": ("upper", "lower"), "below": ("lower", "upper")}
_LONG_RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def long_caption(scene: dict) -> str:
    """A paragraph (80-100 words, seven sentences) describing every attribute of the scene.

    In the spirit of the ShareGPT4V / DOCCI dense captions: layout, counts, sizes, colours, the
    relation, the drawing style, the background and the written word with its place. At most
    about 120 SmolLM2 tokens, so the demo's 128-token text budget does not cut it.
    """
    n, rel, t = scene["count"], scene["relation"], scene["template"]
    bg, word, at = scene["background"], scene["word"], scene["word_at"]
    a_part, b_part = _PARTS[rel]
    a_desc = f"{scene['a_size']} {scene['a_colour']} {scene['a_shape']}"
    b_desc = f"{scene['b_size']} {scene['b_colour']} {scene['b_shape']}"
    a_ref = f"{scene['a_colour']} {plural(scene['a_shape']) if n > 1 else scene['a_shape']}"
    b_ref = f"{scene['b_colour']} {scene['b_shape']}"
    opening = [
        f"This is a simple, flat illustration on a plain {bg} background.",
        f"The image is a clean digital drawing with a uniform {bg} background.",
        f"A minimal graphic scene is shown against a solid {bg} background.",
    ][t]
    if n == 1:
        group = f"In the {a_part} part of the picture there is a single {a_desc}."
    else:
        # A's cells run along the longer side of its half (see layout.cells)
        row = "stacked one above the other" if rel in ("left of", "right of") else "lined up side by side in a row"
        group = f"In the {a_part} part of the picture there are {COUNT_WORDS[n]} {plural(a_desc)}, {row}."
    where = (f"{'They are' if n > 1 else 'It is'} placed {_LONG_RELATION[rel]} {article(b_desc)} {b_desc}, "
             f"alone in the {b_part} part.")
    if scene["a_size"] == scene["b_size"]:
        sizes = f"The {a_ref} and the {b_ref} are drawn at about the same size."
    else:
        sizes = f"The {b_ref} is clearly {'larger' if scene['b_size'] == 'large' else 'smaller'} than the {a_ref}."
    style = "All shapes are flat and solid, with no outlines or shading."
    text = text_colour_name(bg)
    writing = [
        f"Along the {at} edge of the image, the word \"{word}\" is printed in bold {text} capital letters.",
        f"A band at the {at} carries the word \"{word}\", written in bold {text} capitals.",
        f"The {at} of the picture shows the text \"{word}\" in large {text} block letters.",
    ][t]
    total = f"There are {COUNT_WORDS[n + 1]} shapes in total and nothing else."
    return " ".join((opening, group, where, sizes, style, writing, total))


def captions(scene: dict) -> dict[str, str]:
    """A short and a dense caption of the same scene, in different words."""
    return {"short": short_caption(scene), "dense": dense_caption(scene)}


# ------------------------------------------------------------- German and French short captions
# The short caption's content: count, colour and shape of A, the relation, colour and shape of B.

# shape -> (grammatical gender, singular, plural)
DE_SHAPES = {
    "circle": ("m", "Kreis", "Kreise"), "square": ("n", "Quadrat", "Quadrate"),
    "triangle": ("n", "Dreieck", "Dreiecke"), "star": ("m", "Stern", "Sterne"),
    "hexagon": ("n", "Sechseck", "Sechsecke"), "diamond": ("f", "Raute", "Rauten"),
}
# Colour -> adjective stem. "orange", "lila" and "rosa" do not decline in standard German, so
# the declinable "orangefarben", "violett" and "rosafarben" are used instead.
DE_COLOURS = {
    "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "orange": "orangefarben",
    "purple": "violett", "pink": "rosafarben", "brown": "braun", "black": "schwarz", "white": "weiß",
}
DE_NUMBERS = {2: "zwei", 3: "drei", 4: "vier"}
# gender -> (indefinite article, adjective ending): A is nominative, B is dative after the
# (location) prepositions; plural A has no article, so the adjective takes the strong "-e".
_DE_NOMINATIVE = {"m": ("ein", "er"), "n": ("ein", "es"), "f": ("eine", "e")}
_DE_DATIVE = {"m": ("einem", "en"), "n": ("einem", "en"), "f": ("einer", "en")}
DE_RELATIONS = {"left of": "links von", "right of": "rechts von", "above": "über", "below": "unter"}


def german_caption(scene: dict) -> str:
    """``zwei rote Kreise links von einem blauen Stern``."""
    n = scene["count"]
    a_gender, a_one, a_many = DE_SHAPES[scene["a_shape"]]
    a_colour = DE_COLOURS[scene["a_colour"]]
    if n == 1:
        art, ending = _DE_NOMINATIVE[a_gender]
        a = f"{art} {a_colour}{ending} {a_one}"
    else:
        a = f"{DE_NUMBERS[n]} {a_colour}e {a_many}"
    b_gender, b_one, _ = DE_SHAPES[scene["b_shape"]]
    art, ending = _DE_DATIVE[b_gender]
    return f"{a} {DE_RELATIONS[scene['relation']]} {art} {DE_COLOURS[scene['b_colour']]}{ending} {b_one}"


# shape -> (grammatical gender, singular, plural)
FR_SHAPES = {
    "circle": ("m", "cercle", "cercles"), "square": ("m", "carré", "carrés"),
    "triangle": ("m", "triangle", "triangles"), "star": ("f", "étoile", "étoiles"),
    "hexagon": ("m", "hexagone", "hexagones"), "diamond": ("m", "losange", "losanges"),
}
# Colour -> (masculine singular, feminine singular, masculine plural, feminine plural). "orange"
# and "marron" are nouns used as colours and stay invariable; "rose" agrees like an adjective.
FR_COLOURS = {
    "red": ("rouge", "rouge", "rouges", "rouges"), "green": ("vert", "verte", "verts", "vertes"),
    "blue": ("bleu", "bleue", "bleus", "bleues"), "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
    "orange": ("orange", "orange", "orange", "orange"),
    "purple": ("violet", "violette", "violets", "violettes"),
    "pink": ("rose", "rose", "roses", "roses"), "brown": ("marron", "marron", "marron", "marron"),
    "black": ("noir", "noire", "noirs", "noires"),
    "white": ("blanc", "blanche", "blancs", "blanches"),
}
FR_NUMBERS = {2: "deux", 3: "trois", 4: "quatre"}
# "de" before the indefinite article of B elides: "à gauche d'un cercle", "au-dessus d'une étoile".
FR_RELATIONS = {"left of": "à gauche", "right of": "à droite", "above": "au-dessus", "below": "en dessous"}


def _fr_colour(colour: str, gender: str, many: bool) -> str:
    return FR_COLOURS[colour][(gender == "f") + 2 * many]


def french_caption(scene: dict) -> str:
    """``deux cercles rouges à gauche d'une étoile bleue``."""
    n = scene["count"]
    a_gender, a_one, a_many = FR_SHAPES[scene["a_shape"]]
    if n == 1:
        a = f"{'une' if a_gender == 'f' else 'un'} {a_one} {_fr_colour(scene['a_colour'], a_gender, False)}"
    else:
        a = f"{FR_NUMBERS[n]} {a_many} {_fr_colour(scene['a_colour'], a_gender, True)}"
    b_gender, b_one, _ = FR_SHAPES[scene["b_shape"]]
    b = f"d'{'une' if b_gender == 'f' else 'un'} {b_one} {_fr_colour(scene['b_colour'], b_gender, False)}"
    return f"{a} {FR_RELATIONS[scene['relation']]} {b}"


# Caption style (``SyntheticSource.captions`` values) -> the function that writes it from a scene.
CAPTION_STYLES: dict[str, Callable[[dict], str]] = {
    "short": short_caption, "dense": dense_caption, "long": long_caption,
    "de": german_caption, "fr": french_caption,
}
assert tuple(CAPTION_STYLES) == SYNTHETIC_CAPTION_STYLES


# --------------------------------------------------------------------------------- samples


def caption_plan(src: SyntheticSource, caption_fields: tuple[str, ...]) -> dict[str, str]:
    """Caption field -> style for ``src`` under ``common.caption_fields``.

    Without ``src.captions`` the first field gets ``short`` and every further one ``dense`` (the
    demo's training data). Otherwise ``src.captions`` must name exactly ``caption_fields``.

    Raises:
        StageError: ``src.captions`` names other fields than ``caption_fields``.
    """
    if not src.captions:
        return {f: "short" if i == 0 else "dense" for i, f in enumerate(caption_fields)}
    missing = [f for f in caption_fields if f not in src.captions]
    unknown = [f for f in src.captions if f not in caption_fields]
    if missing or unknown:
        raise StageError(
            f"synthetic source {src.name!r}: captions maps {sorted(src.captions)}, but "
            f"common.caption_fields is {list(caption_fields)} (missing: {missing}, unknown: {unknown}); "
            "map every caption field to a style, or leave captions empty"
        )
    return {f: src.captions[f] for f in caption_fields}


def iter_synthetic(src: SyntheticSource, seed: int, caption_fields: tuple[str, ...]) -> Iterator[RawSample]:
    """Yield ``src.count`` scenes with one caption per field, in the style :func:`caption_plan` says.

    Raises:
        StageError: at the call (not at the first sample) when ``src.captions`` does not fit
            ``caption_fields``.
    """
    plan = caption_plan(src, caption_fields)
    return _samples(src, seed, plan)


def _samples(src: SyntheticSource, seed: int, plan: dict[str, str]) -> Iterator[RawSample]:
    rng = random.Random(f"{seed}/{src.name}")
    for i in range(src.count):
        scene = _scene(rng)
        image = render(scene, src.image_size, rng)
        yield RawSample(
            source=src.name, source_id=f"seed{seed}/{i:06d}", key=make_key(src.name, f"{i:06d}"),
            image=image, captions={f: CAPTION_STYLES[style](scene) for f, style in plan.items()},
            label=scene["a_shape"],
        )
