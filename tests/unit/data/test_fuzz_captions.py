"""Fuzz the caption normaliser and validator (``clean_text``, ``clean_captions``) with hostile values.

Properties: any value (text with NULs, BOMs, controls, lone surrogates, combining marks, giant
strings; numbers, lists, dicts, bytes) gives cleaned captions or a ``SampleRejected`` with a
caption reason, never another exception; a clean caption among junk is always kept; cleaning is
stable (cleaning twice changes nothing); the fast path for giant captions gives exactly what
cleaning the whole value gives. Profiles: see ``test_fuzz_support``.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz_support import any_text, bad_bytes, clean_caption, fuzz, json_values, record

from llm2clip.config import ValidationConfig
from llm2clip.data import records as R
from llm2clip.data.records import SampleRejected
from llm2clip.data.validate import _clean_field, clean_captions, clean_text, cut_at_word

FIELDS = ("short", "dense")
_DROPPED = {"Cc", "Cf", "Cs", "Co"}
configs = st.builds(ValidationConfig, min_caption_chars=st.integers(0, 8), max_caption_chars=st.integers(1, 120),
                    min_captions=st.integers(1, 4))
raw_values = st.one_of(json_values, bad_bytes, st.lists(st.one_of(any_text, bad_bytes, json_values), max_size=4))


def check_caption(text: str, cfg: ValidationConfig) -> None:
    """What every kept caption must be: clean, UTF-8, within the length bounds, stable."""
    assert isinstance(text, str) and cfg.min_caption_chars <= len(text) <= cfg.max_caption_chars
    assert text == text.strip() and "  " not in text
    assert not any(unicodedata.category(ch) in _DROPPED for ch in text), ascii(text)
    text.encode("utf-8")  # no lone surrogate survives
    assert clean_text(text) == text, "cleaning a cleaned caption changed it"


@fuzz()
@given(raw=st.fixed_dictionaries({"short": raw_values, "dense": raw_values}), cfg=configs,
       optional=st.sampled_from([frozenset(), frozenset({"dense"})]))
def test_any_caption_value_is_cleaned_or_rejected_with_a_reason(raw, cfg, optional):
    stats = Counter()
    try:
        out = clean_captions(raw, FIELDS, cfg, stats, optional)
    except SampleRejected as rej:
        assert rej.reason in (R.MISSING_CAPTION, R.TOO_FEW_CAPTIONS) and rej.detail
        record(rej.reason)
        return
    record("kept")
    assert set(out) == set(FIELDS)
    for name, captions in out.items():
        assert len(set(captions)) == len(captions), "exact duplicates are kept once"
        assert captions or name in optional
        for text in captions:
            check_caption(text, cfg)


@fuzz()
@given(good=clean_caption, junk=st.lists(st.one_of(any_text, bad_bytes, json_values), max_size=6),
       at=st.integers(0, 6))
def test_a_clean_caption_among_junk_is_kept(good, junk, at):
    junk.insert(min(at, len(junk)), good)
    out = clean_captions({"short": junk, "dense": junk}, FIELDS, ValidationConfig(), Counter())
    assert good in out["short"] and good in out["dense"]


@fuzz()
@given(text=any_text)
@example(text="e\u200d\u0301")  # a zero-width joiner between a letter and its accent
@example(text="\u1100\u200b\u1161")  # Hangul jamo split by a zero-width space
def test_cleaning_is_stable(text):
    once = clean_text(text)
    assert clean_text(once) == once
    assert not any(unicodedata.category(ch) in _DROPPED for ch in once)


# Combining marks of several classes, letters, spaces and dropped characters: cleaning a giant
# caption from a prefix must give what cleaning the whole of it gives.
_PIECES = st.sampled_from(["a", "e", " ", "<", "\u0301", "\u0316", "\u0327", "\u0338", "\u05b0", "\u200b", "\x00",
                           "\x1c", "\x7f", "\ufb01", "\u00b4", "\u1100", "\u1161", "\n", "\u3000", "\ud800",
                           "\U0001f600"])


@fuzz()
@given(limit=st.integers(1, 40), unit=st.lists(_PIECES, min_size=1, max_size=40).map("".join),
       tail=st.lists(_PIECES, max_size=40).map("".join))
@example(limit=20, unit="\u0301", tail="\u0316")  # one combining sequence longer than the prefix
def test_giant_caption_fast_path_equals_cleaning_all_of_it(limit, unit, tail):
    cfg = ValidationConfig(max_caption_chars=limit, min_caption_chars=0)
    value = unit * (1 + (8 * limit + 1100) // len(unit)) + tail  # longer than the fast-path threshold
    fast = _clean_field([value], cfg, Counter())
    whole = cut_at_word(clean_text(value), limit)
    assert fast == [whole]
