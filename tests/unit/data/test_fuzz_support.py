"""Shared pieces of the hostile-input fuzz tests (``test_fuzz_*.py``): profiles, strategies, checks.

Profiles (choose with ``HYPOTHESIS_PROFILE``):

* ``fuzz`` (default, what ``make test`` runs): 30 examples per test (fewer for the end-to-end
  ones), derandomized so CI sees the same cases every run, no example database on disk.
* ``long``: 1000 examples per test, random each run; a failure prints a ``@reproduce_failure``
  blob. ``HYPOTHESIS_PROFILE=long .venv/bin/pytest -q -p no:cacheprovider tests/unit/data/test_fuzz_*.py``

With ``FUZZ_REPORT=path.json`` every case's outcome (kept, or its quarantine reason) is counted per
test and written there at exit: the numbers of ``docs/reliability.md``.

Every test reads with the real readers and validators on real files (no mocks).
"""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from llm2clip.config import ValidationConfig
from llm2clip.data import records as R
from llm2clip.data.collect import write_quarantine
from llm2clip.data.records import Rejection, SampleRejected
from llm2clip.data.shards import encode_meta
from llm2clip.data.validate import validate_sample

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.filter_too_much]
settings.register_profile("fuzz", max_examples=30, deadline=None, database=None, derandomize=True,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fuzz")
FUZZ = settings.get_profile(PROFILE)
TIMEOUT = 300 if FUZZ.max_examples <= 50 else 7200  # seconds per test (pytest-timeout), all examples together


OUTCOMES: defaultdict[str, Counter] = defaultdict(Counter)


def record(*outcomes: str) -> None:
    """Count what fuzz cases came to (``kept``, a reason, ``StageError``) under the running test."""
    OUTCOMES[os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]].update(outcomes)


def _write_report() -> None:
    Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(OUTCOMES, indent=1, sort_keys=True) + "\n")


if os.environ.get("FUZZ_REPORT"):
    atexit.register(_write_report)


def fuzz(share: float = 1.0) -> settings:
    """The active profile, with ``share`` of its examples (at least 3) for slower tests."""
    return settings(FUZZ, max_examples=max(3, round(FUZZ.max_examples * share)))


# ------------------------------------------------------------------------------ strategies

# Characters that break naive readers: NUL, BOM, CR/LF, separators, quotes, bidi and zero-width
# controls, a lone surrogate, combining marks, compatibility forms, a non-BMP emoji.
NASTY_CHARS = ("\x00", "\ufeff", "\r", "\n", "\r\n", "\u2028", "\u0085", ",", '"', "'", "\t", "\\", "{", "}",
               "\u202e", "\u200b", "\u200d", "\udc80", "\ud800", "\u0301", "\u0316", "\ufb01", "\u2460",
               "\uff21", "\U0001f600", "..", "/", "%", "\x1b", "\x7f")
nasty_text = st.lists(st.one_of(st.sampled_from(NASTY_CHARS), st.text(max_size=4)), max_size=12).map("".join)
any_text = st.one_of(st.text(max_size=30), nasty_text)
BAD_UTF8 = (b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
            b"\xef\xbb\xbf", b"\x00", b"\x81", b"\x8d")
bad_bytes = st.lists(st.one_of(st.sampled_from(BAD_UTF8), st.binary(max_size=4)), min_size=1, max_size=6).map(
    b"".join)
# JSON-ish values a caption or path field may hold in a hostile file.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=6,
)

_WORD = st.text(alphabet=st.sampled_from(list("abcxyzABC0129éßøñ漢字😀,.;'\"-()")), min_size=1, max_size=8)
# A caption the validator keeps unchanged: NFKC-stable words, single spaces, 3..80 characters.
clean_caption = st.lists(_WORD, min_size=1, max_size=8).map(" ".join).filter(lambda c: 3 <= len(c) <= 80)


# ---------------------------------------------------------------------------------- checks


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file, link and folder under ``root``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st_ = path.lstat()
            out[str(path.relative_to(root))] = (st_.st_size if not path.is_dir() else 0, st_.st_mtime_ns)
    return out


def changed_outside(before: dict, after: dict, allowed: str) -> list[str]:
    """Paths created, changed or removed between two :func:`tree` snapshots, except under ``allowed``."""
    names = set(before) | set(after)
    return sorted(n for n in names if before.get(n) != after.get(n)
                  and n != allowed and not n.startswith(allowed.rstrip("/") + "/"))


def validate_all(raws, fields: tuple[str, ...], cfg: ValidationConfig, out: Path):
    """Validate like the stage's pass 1 and serialise like it does (shard json, quarantine.jsonl).

    Returns:
        ``(kept records by key, rejections, stats)``; a kept key seen twice is a test failure.
    """
    kept, rejects, stats = {}, [], Counter()
    for raw in raws:
        try:
            if raw.error is not None:
                raise SampleRejected(*raw.error)
            sample, _jpg = validate_sample(raw, fields, cfg, max_side=64, jpeg_quality=80, stats=stats)
        except SampleRejected as rej:
            rejects.append(Rejection(raw.key, raw.source, raw.source_id, rej.reason, rej.detail, line=raw.line))
            continue
        assert sample.key not in kept, f"two kept samples with key {sample.key}"
        json.loads(encode_meta(sample.meta(fields)))  # the shard's json member must encode
        kept[sample.key] = sample
    record(*["kept"] * len(kept), *(r.reason for r in rejects))
    write_quarantine(out / "quarantine.jsonl", rejects)  # must encode too
    back = [json.loads(line) for line in (out / "quarantine.jsonl").read_text("utf-8").splitlines()]
    assert len(back) == len(rejects)
    for r in back:
        assert r["reason"] in R.REASONS and r["detail"], r
    return kept, rejects, stats


def test_profiles_are_bounded_by_default():
    """The default profile keeps ``make test`` fast: bounded examples, no database in the work tree."""
    profile = settings.get_profile("fuzz")
    assert profile.max_examples <= 50 and profile.deadline is None and profile.database is None
    assert settings.get_profile("long").max_examples >= 1000
