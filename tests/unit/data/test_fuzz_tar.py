"""Fuzz the webdataset tar reader (``iter_webdataset``) with hostile shards (hypothesis).

Members named ``../x`` or ``/abs/x``, symlinks and hard links (to files outside the folder),
FIFOs and devices, duplicate members, invalid UTF-8 captions, broken JSON, giant captions,
compressed, truncated and corrupted shards, random bytes. Properties: every sample that cannot be
used is a quarantine record with a reason naming its shard and member key, or the shard is one
``unreadable_shard`` record; valid samples beside hostile ones all come out with their captions;
nothing is written anywhere (links are never followed). Profiles: see ``test_fuzz_support``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bad_inputs as B
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz_support import any_text, bad_bytes, changed_outside, clean_caption, fuzz, record, tree, validate_all

from llm2clip.config import ValidationConfig, WebDatasetSource
from llm2clip.data import records as R
from llm2clip.data import sources
from llm2clip.data.records import KEY_PATTERN, make_key
from llm2clip.data.sources import iter_webdataset
from llm2clip.data.validate import cut_at_word

FIELDS = ("short", "dense")
CFG = ValidationConfig()
IMAGES = [B.good_jpeg(64, 48, seed=j) for j in range(4)]
PREFIXES = ["", "shard/", "../", "../../../etc/", "/", "/tmp/abs/", "a/./b/", "x" * 120 + "/", "ünï/", "\udcff\udcfe/"]


@dataclass
class Member:
    """One tar member: a regular file (``data``) or a special one (``kind``: sym, lnk, fifo, chr, dir)."""

    name: str
    data: bytes = b""
    kind: str = "file"
    link: str = ""


@dataclass
class Group:
    """The members of one sample; ``valid`` ones must come out with ``short``/``dense`` captions."""

    key: str
    members: list[Member]
    valid: bool = False
    short: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    expect: str = ""  # the reason a hostile sample must be quarantined with ("": kept or any reason)

    def __repr__(self) -> str:  # keep failure reports short
        return f"Group({self.key!r}, {[(m.name, m.kind, len(m.data)) for m in self.members]}, valid={self.valid})"


@st.composite
def valid_group(draw, i: int) -> Group:
    key = draw(st.sampled_from(PREFIXES)) + f"v{i}"
    short = draw(clean_caption)
    if draw(st.integers(0, 9)) == 0:  # giant caption: kept, cut at a word boundary
        short = " ".join([short] * (CFG.max_caption_chars * 30 // len(short)))
    dense = draw(st.lists(clean_caption, max_size=2, unique=True))
    members = [Member(f"{key}.jpg", draw(st.sampled_from(IMAGES))), Member(f"{key}.txt", short.encode())]
    if dense or draw(st.booleans()):
        members.append(Member(f"{key}.json", json.dumps({"dense": dense, "other": [1, None]}).encode()))
    members = draw(st.permutations(members))
    return Group(key, members, True, [cut_at_word(short, CFG.max_caption_chars)], dense)


@st.composite
def hostile_group(draw, i: int, victim: str) -> Group:
    """A sample with one hostile trait (the reader must quarantine it or keep it harmlessly)."""
    key = draw(st.sampled_from(PREFIXES)) + f"h{i}"
    jpg, txt = Member(f"{key}.jpg", draw(st.sampled_from(IMAGES))), Member(f"{key}.txt", b"a hostile caption")
    trait = draw(st.sampled_from(["sym", "lnk", "fifo", "chr", "dup", "bad_utf8", "bad_json", "no_image",
                                  "bad_image", "json_types", "upper_ext", "nested_ext"]))
    if trait in ("sym", "lnk", "fifo", "chr"):
        target = draw(st.sampled_from([victim, "/etc/passwd", "../../victim.jpg", "v0.jpg", ""]))
        jpg = Member(jpg.name, kind=trait, link=target)
    elif trait == "dup":
        txt = [txt, Member(txt.name, draw(clean_caption).encode())]
    elif trait == "bad_utf8":
        txt = Member(txt.name, b"caption " + draw(bad_bytes) + b" end")
    elif trait == "bad_json":
        txt = [txt, Member(f"{key}.json", draw(st.one_of(bad_bytes, st.just(b"[" * 100_000), any_text.map(
            lambda t: t.encode("utf-8", "surrogatepass")))))]
    elif trait == "no_image":
        jpg = Member(f"{key}.cls", b"3")
    elif trait == "bad_image":
        jpg = Member(jpg.name, draw(st.sampled_from([B.truncated_jpeg(), B.not_an_image(), b"",
                                                     B.png_header_only(90000, 90000)])))
    elif trait == "json_types":
        txt = [txt, Member(f"{key}.json", json.dumps({"dense": draw(st.sampled_from(
            [None, 3, {"a": 1}, [[1]], ["\ud800x"], "ok dense caption"]))}).encode())]
    elif trait == "upper_ext":
        jpg = Member(f"{key}.JPG", jpg.data)
    else:
        jpg = Member(f"{key}.seg.jpg", jpg.data)
    members = [jpg, *(txt if isinstance(txt, list) else [txt])]
    return Group(key, draw(st.permutations(members)), expect=_expected_reason(trait, members))


def _expected_reason(trait: str, members: list[Member]) -> str:
    if trait in ("sym", "lnk", "fifo", "chr", "dup"):
        return R.BAD_MEMBER
    if trait == "no_image":
        return R.MISSING_IMAGE
    data = members[-1].data if trait == "bad_json" else members[1].data
    try:
        json.loads(data) if trait == "bad_json" else data.decode("utf-8")
    except (ValueError, RecursionError):
        return R.BAD_METADATA if trait == "bad_json" else R.BAD_ENCODING
    return ""


def build_tar(groups: list[Group], fmt: int, noise: list[Member]) -> bytes:
    """A tar stream of every group's members in order (``noise``: folders and odd names, first)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in noise + [m for g in groups for m in g.members]:
            info = tarfile.TarInfo(m.name)
            info.type = {"file": tarfile.REGTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE, "dir": tarfile.DIRTYPE}[m.kind]
            info.linkname, info.size = m.link, len(m.data) if m.kind == "file" else 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> tuple[bytes, str]:
    """``(bytes, file suffix)`` of the tar, plain or compressed."""
    pack = {"": lambda d: d, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[how]
    return pack(data), f".tar.{how}" if how else ".tar"


NOISE = st.lists(st.sampled_from([Member("folder/", kind="dir"), Member("../", kind="dir"), Member("README"),
                                  Member(".hidden.jpg", b"x"), Member("/", kind="dir")]), max_size=3)


def read_shard(work: Path, data: bytes, suffix: str, optional: bool = True):
    """Write the shard under ``work``, read and validate it like the stage; checks the tree is untouched."""
    shard = work / f"shard{suffix}"
    shard.write_bytes(data)
    (work / "out").mkdir(exist_ok=True)
    src = WebDatasetSource(name="w", urls=str(shard), caption_fields={"short": "txt", "dense": "json:dense"},
                           optional_captions=("dense",) if optional else ())
    before = tree(work.parent)
    kept, rejects, _ = validate_all(iter_webdataset(src), FIELDS, CFG, work / "out")
    assert changed_outside(before, tree(work.parent), f"{work.name}/out") == []
    for rej in rejects:
        assert rej.reason in R.REASONS and str(shard) in rej.source_id, rej
    return kept, rejects, str(shard)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with a ``victim.jpg`` that hostile links point at (it must stay untouched)."""
    folder = tmp_path_factory.mktemp("fuzz-tar")
    (folder / "victim.jpg").write_bytes(IMAGES[0])
    return folder


@fuzz()
@given(data=st.data(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       how=st.sampled_from(["", "", "gz", "bz2", "xz"]))
def test_valid_samples_survive_hostile_members(base, data, fmt, how):
    victim = str(base / "victim.jpg")
    groups = [data.draw(valid_group(i)) for i in range(data.draw(st.integers(1, 5)))]
    groups += [data.draw(hostile_group(i, victim)) for i in range(data.draw(st.integers(0, 6)))]
    groups = data.draw(st.permutations(groups))
    shard_bytes, suffix = compress(build_tar(groups, fmt, data.draw(NOISE)), how)
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), shard_bytes, suffix)
    for g in (g for g in groups if g.valid):
        key = make_key("w", g.key)
        assert key in kept, f"valid sample {g.key!r} lost; quarantine: {[(r.reason, r.detail) for r in rejects]}"
        assert kept[key].captions == {"short": g.short, "dense": g.dense}
        record("valid_checked")
    accounted = {r.source_id.split("#", 1)[-1] for r in rejects} | {k.source_id.split("#", 1)[-1]
                                                                    for k in kept.values()}
    for g in groups:  # nothing vanishes silently: every sample is kept or quarantined
        assert g.key in accounted, (g, [(r.reason, r.detail) for r in rejects])
    for g in (g for g in groups if g.expect):
        assert (g.expect, f"{url}#{g.key}") in {(r.reason, r.source_id) for r in rejects}, (g, rejects)
    for sample in kept.values():  # bytes that are not UTF-8 are never replaced silently
        assert not any("\ufffd" in c for v in sample.captions.values() for c in v), sample
    assert R.UNREADABLE_SHARD not in {r.reason for r in rejects}


@fuzz()
@given(data=st.data(), how=st.sampled_from(["", "gz", "xz"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))
@example(data=None, how="", cut=0.999, flips=[])
def test_truncated_or_corrupt_shards_never_crash_and_say_which_shard(base, data, how, cut, flips):
    groups = [Group(f"v{i}", [Member(f"v{i}.jpg", IMAGES[i % 4]), Member(f"v{i}.txt", b"some caption")], True,
                    ["some caption"]) for i in range(4)]
    if data is not None:
        groups.append(data.draw(hostile_group(9, "/etc/passwd")))
    raw, suffix = compress(build_tar(groups, tarfile.PAX_FORMAT, []), how)
    raw = bytearray(raw[: max(1, int(cut * len(raw)))])
    for where, value in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] = value
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), bytes(raw), suffix)
    if not flips:  # tar has no checksums: a flipped byte inside a caption is read as it is
        for g in (g for g in groups if g.valid and make_key("w", g.key) in kept):  # kept: whole and right
            assert kept[make_key("w", g.key)].captions == {"short": ["some caption"], "dense": []}
    seen = {r.source_id for r in rejects} | {k.source_id for k in kept.values()}
    if any(f"{url}#{g.key}" not in seen for g in groups):  # a sample not read: the shard says so
        assert (R.UNREADABLE_SHARD, url) in {(r.reason, r.source_id) for r in rejects}, rejects


@fuzz()
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".tar", ".tar.gz", ".tgz", ".bin"]))
def test_random_bytes_as_a_shard_are_one_record_or_nothing(base, data, suffix):
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), data, suffix)
    assert not kept


def test_a_member_over_the_size_limit_is_not_read(base, monkeypatch):
    """A decompression bomb in a gzip shard (a huge member of zeros) is refused, not read into memory."""
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1 << 20)
    groups = [Group("bomb", [Member("bomb.jpg", b"\0" * (4 << 20)), Member("bomb.txt", b"a caption")]),
              Group("v0", [Member("v0.jpg", IMAGES[0]), Member("v0.txt", b"a good caption")], True)]
    raw, suffix = compress(build_tar(groups, tarfile.PAX_FORMAT, []), "gz")
    assert len(raw) < 64 << 10
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), raw, suffix)
    assert list(kept) == [make_key("w", "v0")]
    assert [(r.reason, "bomb" in r.source_id) for r in rejects] == [(R.BAD_MEMBER, True)], rejects


@fuzz()
@given(text=st.one_of(st.text(), st.sampled_from(PREFIXES).map(lambda p: p + "../../x.jpg")))
def test_keys_are_safe_names_whatever_the_member_name(text):
    """Output members are named by key: never a path, never hidden, always [A-Za-z0-9_-]."""
    import re

    key = make_key("w", text)
    assert re.match(KEY_PATTERN, key) and "/" not in key and not key.startswith(".")


def test_the_sample_being_read_when_the_shard_breaks_is_quarantined_by_key(base):
    """Truncated right after v1's members: v0 is kept, v1 (maybe incomplete) and the shard are quarantined."""
    groups = [Group(f"v{i}", [Member(f"v{i}.jpg", IMAGES[i]), Member(f"v{i}.txt", b"a caption")], True)
              for i in range(2)]
    raw = build_tar(groups, tarfile.PAX_FORMAT, [])
    end_of_v1 = raw.rindex(b"a caption") + 512  # the next 512-byte block: where the end marker was
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), raw[: end_of_v1 - end_of_v1 % 512] + b"\x01" * 100, ".tar")
    assert list(kept) == [make_key("w", "v0")]
    assert [(r.reason, r.source_id) for r in rejects] == [(R.UNREADABLE_SHARD, f"{url}#v1"),
                                                          (R.UNREADABLE_SHARD, url)]


@pytest.mark.parametrize("damage", ["bad_header", "zeroed_header", "concatenated"])
def test_a_broken_header_or_a_second_archive_is_not_a_silent_end(base, damage):
    """tarfile ends quietly at a bad or zeroed header and at the end of the first of two concatenated
    tars: the samples after it must not vanish without a record."""
    groups = [Group(f"v{i}", [Member(f"v{i}.jpg", IMAGES[i]), Member(f"v{i}.txt", b"a caption")], True)
              for i in range(4)]
    raw = bytearray(build_tar(groups, tarfile.GNU_FORMAT, []))
    at = raw.index(b"v2.jpg")
    assert at % 512 == 0
    if damage == "bad_header":
        raw[at + 148] ^= 0x55  # the checksum field
    elif damage == "zeroed_header":
        raw[at: at + 512] = bytes(512)
    else:
        raw = build_tar(groups[:2], tarfile.GNU_FORMAT, []) + build_tar(groups[2:], tarfile.GNU_FORMAT, [])
    with tempfile.TemporaryDirectory(dir=base) as work:
        kept, rejects, url = read_shard(Path(work), bytes(raw), ".tar")
    assert (R.UNREADABLE_SHARD, url) in {(r.reason, r.source_id) for r in rejects}
    assert make_key("w", "v0") in kept and len(kept) + len(rejects) >= 3
