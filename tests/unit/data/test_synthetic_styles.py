"""Synthetic caption styles: today's output pinned, long / German / French captions, config."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from llm2clip.config import SyntheticSource
from llm2clip.config.base import ConfigError
from llm2clip.config.prepare_data import SYNTHETIC_CAPTION_STYLES
from llm2clip.data.layout import COUNT_WORDS, plural
from llm2clip.data.synthetic import (
    DE_COLOURS,
    DE_NUMBERS,
    FR_COLOURS,
    FR_NUMBERS,
    SHAPES,
    _scene,
    caption_plan,
    class_scene,
    french_caption,
    german_caption,
    iter_synthetic,
    long_caption,
    text_colour_name,
)
from llm2clip.io import StageError

# sha256 of the first 30 default scenes (seed 0, caption fields short/dense), recorded before the
# caption styles were added. The e2e test pins training metrics on exactly these samples.
DEFAULT_SHA256 = "19476bdcbf4aac12bc296784362a92501099842767770cc180936b416a8e6239"
ALL_STYLES = {style: style for style in SYNTHETIC_CAPTION_STYLES}


def digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.key.encode())
        h.update(s.image.tobytes())
        h.update(repr(sorted(s.captions.items())).encode())
        h.update(repr(s.label).encode())
    return h.hexdigest()


def scenes(n: int = 300) -> list[dict]:
    rng = random.Random("styles")
    return [_scene(rng) for _ in range(n)]


# ------------------------------------------------------------------------- today's output


def test_default_source_output_is_unchanged():
    assert digest(iter_synthetic(SyntheticSource(count=30), 0, ("short", "dense"))) == DEFAULT_SHA256


def test_styles_do_not_change_the_pictures_keys_or_labels():
    plain = list(iter_synthetic(SyntheticSource(count=20, image_size=64), 5, ("short", "dense")))
    styled = list(iter_synthetic(SyntheticSource(count=20, image_size=64, captions=ALL_STYLES), 5,
                                 SYNTHETIC_CAPTION_STYLES))
    for a, b in zip(plain, styled, strict=True):
        assert (a.key, a.label, a.image.tobytes()) == (b.key, b.label, b.image.tobytes())
        assert (a.captions["short"], a.captions["dense"]) == (b.captions["short"], b.captions["dense"])


def test_default_plan_is_short_then_dense():
    src = SyntheticSource()
    assert caption_plan(src, ("a", "b", "c")) == {"a": "short", "b": "dense", "c": "dense"}
    assert caption_plan(src, ("a",)) == {"a": "short"}


# --------------------------------------------------------------------------------- config


def test_unknown_style_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"captions\.zh = 'zh'.*'short', 'dense', 'long', 'de', 'fr'"):
        SyntheticSource(captions={"zh": "zh"})
    with pytest.raises(ConfigError, match="<empty>"):
        SyntheticSource(captions={"": "long"})


def test_mapping_must_name_exactly_the_caption_fields():
    src = SyntheticSource(captions={"de": "de", "long": "long"})
    with pytest.raises(StageError, match=r"missing: \['fr'\], unknown: \['long'\]"):
        iter_synthetic(src, 0, ("de", "fr"))  # raised at the call, before any sample
    (s,) = iter_synthetic(SyntheticSource(count=1, image_size=64, captions={"x": "fr"}), 0, ("x",))
    assert set(s.captions) == {"x"} and " d'un" in s.captions["x"]  # French


def test_styled_source_is_deterministic_by_seed():
    src = SyntheticSource(count=8, image_size=48, captions=ALL_STYLES)
    first, again = (digest(iter_synthetic(src, 1, SYNTHETIC_CAPTION_STYLES)) for _ in range(2))
    other = digest(iter_synthetic(src, 2, SYNTHETIC_CAPTION_STYLES))
    assert first == again != other


# ------------------------------------------------------------------------ German / French


def scene(count, a, rel, b) -> dict:
    (a_colour, a_shape), (b_colour, b_shape) = a.split(), b.split()
    return {"count": count, "relation": rel, "a_colour": a_colour, "a_shape": a_shape,
            "b_colour": b_colour, "b_shape": b_shape}


HAND_CHECKED = [
    (scene(2, "red circle", "left of", "blue star"),
     "zwei rote Kreise links von einem blauen Stern", "deux cercles rouges à gauche d'une étoile bleue"),
    (scene(1, "white diamond", "above", "black hexagon"),
     "eine weiße Raute über einem schwarzen Sechseck", "un losange blanc au-dessus d'un hexagone noir"),
    (scene(3, "pink star", "below", "orange square"),
     "drei rosafarbene Sterne unter einem orangefarbenen Quadrat",
     "trois étoiles roses en dessous d'un carré orange"),
    (scene(1, "purple triangle", "right of", "yellow diamond"),
     "ein violettes Dreieck rechts von einer gelben Raute", "un triangle violet à droite d'un losange jaune"),
    (scene(3, "white star", "left of", "green star"),
     "drei weiße Sterne links von einem grünen Stern", "trois étoiles blanches à gauche d'une étoile verte"),
    (scene(2, "brown star", "above", "white star"),
     "zwei braune Sterne über einem weißen Stern", "deux étoiles marron au-dessus d'une étoile blanche"),
    (scene(1, "green star", "below", "purple diamond"),
     "ein grüner Stern unter einer violetten Raute", "une étoile verte en dessous d'un losange violet"),
]


@pytest.mark.parametrize(("s", "de", "fr"), HAND_CHECKED)
def test_german_and_french_captions_of_hand_checked_scenes(s, de, fr):
    assert german_caption(s) == de
    assert french_caption(s) == fr


def test_german_and_french_name_the_count_and_both_colours():
    for s in scenes():
        de, fr = german_caption(s), french_caption(s)
        if s["count"] > 1:
            assert de.startswith(DE_NUMBERS[s["count"]] + " ") and fr.startswith(FR_NUMBERS[s["count"]] + " ")
        else:
            assert de.split()[0] in ("ein", "eine") and fr.split()[0] in ("un", "une")
        for colour in (s["a_colour"], s["b_colour"]):
            assert DE_COLOURS[colour] in de
            assert any(form in fr.split() for form in FR_COLOURS[colour])
        assert not any(english in de.split() + fr.split() for english in ("red", "circle", "of", "a"))


# ---------------------------------------------------------------------------------- long


def test_long_caption_is_a_paragraph_with_every_attribute():
    for s in scenes():
        text = long_caption(s)
        assert 60 <= len(text.split()) <= 120 and text.count(". ") >= 5
        n = s["count"]
        assert (COUNT_WORDS[n] if n > 1 else "a single") in text
        assert f"{COUNT_WORDS[n + 1]} shapes" in text
        assert (plural(s["a_shape"]) if n > 1 else s["a_shape"]) in text and s["b_shape"] in text
        for word in ("a_colour", "b_colour", "a_size", "b_size"):
            assert f" {s[word]} " in text
        assert f" {s['background']} background" in text and s["relation"] in text
        assert f'"{s["word"]}"' in text and s["word_at"] in text
        assert re.search(rf"(bold|large) {text_colour_name(s['background'])} ", text)  # the word's colour


def test_long_caption_differs_from_dense_and_short():
    (s,) = iter_synthetic(SyntheticSource(count=1, image_size=64, captions=ALL_STYLES), 0,
                          SYNTHETIC_CAPTION_STYLES)
    c = s.captions
    assert len({c["short"], c["dense"], c["long"]}) == 3 and len(c["long"]) > 2 * len(c["dense"])


def test_class_scene_has_one_shape_class():
    rng = random.Random(0)
    for shape in SHAPES:
        for _ in range(20):
            s = class_scene(shape, rng)
            assert s["a_shape"] == shape != s["b_shape"]
