"""Fuzz the CSV/JSONL manifest reader with hostile bytes, rows and image paths (hypothesis).

Properties: the reader never raises anything but a clear ``StageError``; every bad row is a
quarantine record with a reason and its manifest line; valid rows mixed with hostile ones all
come out as samples with their captions (one row per caption merged, optional fields missing);
nothing is written outside the output folder. Profiles: see ``test_fuzz_support``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import reprlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bad_inputs as B
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz_support import any_text, bad_bytes, changed_outside, clean_caption, fuzz, json_values, record, tree
from test_fuzz_support import validate_all as _validate_all

from llm2clip.config import ManifestSource, ValidationConfig
from llm2clip.data import records as R
from llm2clip.data import sources
from llm2clip.data.records import make_key
from llm2clip.data.sources import iter_manifest
from llm2clip.data.validate import cut_at_word
from llm2clip.io import StageError

FIELDS = ("short", "dense")
CFG = ValidationConfig()
N_IMAGES = 6
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # nested deeper than Python's recursion limit
IMAGE_PROBLEMS = {R.MISSING_IMAGE, R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.CORRUPT_IMAGE, R.IMAGE_TOO_SMALL}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``images/`` (good images, links, a FIFO, a folder, junk) and ``outside/`` beside it."""
    base = tmp_path_factory.mktemp("fuzz-manifest")
    images, outside = base / "images", base / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    for j in range(N_IMAGES):
        (images / f"img{j}.jpg").write_bytes(B.good_jpeg(64, 48, seed=j))
        (outside / f"o{j}.jpg").write_bytes(B.good_jpeg(48, 64, seed=100 + j))
        (images / f"link{j}.jpg").symlink_to(outside / f"o{j}.jpg")
    (images / "text.jpg").write_bytes(B.not_an_image())
    (images / "trunc.jpg").write_bytes(B.truncated_jpeg())
    (images / "folder.jpg").mkdir()
    os.mkfifo(images / "fifo.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    (images / "dangling.jpg").symlink_to(base / "nowhere.jpg")
    return base


def good_path(root: Path, form: int, j: int) -> str:
    """One of several spellings of a readable image (relative, ``..``, absolute, symlink)."""
    return [f"img{j}.jpg", f"./img{j}.jpg", f"sub/../img{j}.jpg", str(root / "images" / f"img{j}.jpg"),
            f"../outside/o{j}.jpg", f"link{j}.jpg"][form]


def bad_paths(root: Path) -> list[str]:
    """Image paths that must be quarantined, never hang, never be followed into a write."""
    return ["text.jpg", "trunc.jpg", "folder.jpg", "fifo.jpg", "loop.jpg", "dangling.jpg", "missing.jpg",
            "/dev/zero", "../" * 12 + "dev/zero", "/dev/null", str(root / "images"), "a\x00b.jpg",
            "x" * 5000 + ".jpg", "img0.jpg/..", "../" * 40]


# ----------------------------------------------------------------------------- strategies


@dataclass
class Sample:
    """A valid sample: its id, image path and captions, written as one or more rows."""

    ident: str | int
    image: str
    short: list[str]
    dense: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # a giant caption must not flood the failure report
        return reprlib.repr(self.__dict__)

    def rows(self) -> list[dict]:
        n = max(len(self.short), len(self.dense))
        pick = lambda v, r: v[r] if r < len(v) else ""  # noqa: E731
        return [{"id": self.ident, "file": self.image, "s": pick(self.short, r), "d": pick(self.dense, r)}
                for r in range(n)]


def spaced(text: str, seps: list[str]) -> str:
    """``text`` with its spaces replaced by other whitespace (quoted newlines in CSV, tabs)."""
    parts = text.split(" ")
    seps = seps + [" "] * len(parts)
    return parts[0] + "".join(s + p for s, p in zip(seps, parts[1:], strict=False))


_SEPS = st.lists(st.sampled_from([" ", "\n", "\r\n", "\t", "  "]), max_size=8)


@st.composite
def valid_samples(draw, jsonl: bool, root: Path) -> list[Sample]:
    """1..6 valid samples with distinct ids; some captions are giant, some have line breaks."""
    out = []
    for i in range(draw(st.integers(1, 6))):
        tail = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=6))
        ident = draw(st.sampled_from([f"v{i}-{tail}", 1000 + i, i])) if jsonl else f"v{i}-{tail}"
        short = [spaced(c, draw(_SEPS)) for c in draw(st.lists(clean_caption, min_size=1, max_size=3, unique=True))]
        dense = [spaced(c, draw(_SEPS)) for c in draw(st.lists(clean_caption, max_size=3, unique=True))]
        if draw(st.integers(0, 9)) == 0:  # a giant caption: read, then cut at a word boundary
            short[0] = " ".join([short[0]] * (CFG.max_caption_chars * 40 // len(short[0])))
        image = good_path(root, draw(st.integers(0, 5)), draw(st.integers(0, N_IMAGES - 1)))
        out.append(Sample(ident, image, short, dense))
    return out


def expected(sample: Sample, rows_in_order: list[dict]) -> dict[str, list[str]]:
    """The cleaned captions the sample must come out with (its rows' captions in file order)."""
    mine = [r for r in rows_in_order if isinstance(r, dict) and r.get("_owner") is sample]
    short = [cut_at_word(" ".join(r["s"].split()), CFG.max_caption_chars) for r in mine if r["s"]]
    return {"short": short, "dense": [" ".join(r["d"].split()) for r in mine if r["d"]]}


@st.composite
def hostile_row(draw, i: int, jsonl: bool, bad: list[str]) -> dict | bytes:
    """A row that should be quarantined (or, if it turns out harmless, kept): a dict or raw bytes."""
    kind = draw(st.sampled_from(["path", "caption", "inject", "types", "short_row", "garbage"]))
    row: dict = {"id": f"h{i}", "file": f"img{draw(st.integers(0, N_IMAGES - 1))}.jpg", "s": "hostile but fine",
                 "d": ""}
    if kind == "path":
        row["file"] = draw(st.sampled_from(bad + ["\ud800.jpg"] if jsonl else bad))
    elif kind == "caption":
        row["s"] = draw(any_text.filter(lambda t: jsonl or not re.search("[\ud800-\udfff]", t)))
        row["d"] = draw(any_text.filter(lambda t: jsonl or not re.search("[\ud800-\udfff]", t)))
    elif kind == "inject":
        row["s"] = "ok text @@INJ@@ more"
        row["_inject"] = draw(bad_bytes.filter(lambda b: not re.search(b'["\r\n\\\\]', b)))
    elif kind == "types" and jsonl:  # ids stay apart from the valid ones (never a str or an int)
        row.update({k: draw(json_values) for k in draw(st.lists(st.sampled_from(["file", "s", "d"])))})
        row["id"] = draw(st.one_of(st.none(), st.booleans(), st.floats(), st.lists(json_values, max_size=2),
                                   st.just(f"h{i}")))
    elif kind == "short_row":
        row = {"id": f"h{i}", "file": row["file"]}
    else:
        text = draw(any_text.filter(lambda t: not re.search("[\r\n\ud800-\udfff]", t)))
        tail = draw(st.sampled_from([b"", b"\xff", b"[1, 2]", b"\xef\xbb\xbf{}", b"\x00", DEEP_JSON]))
        return f"h{i}-{text}".replace('"', "").encode() + tail
    return row


# ----------------------------------------------------------------------------- file layout

_BREAK = re.compile(rb"\r\n|\r|\n")


def render(rows: list[dict | bytes], jsonl: bool, newline: str) -> tuple[bytes, list[int]]:
    """Manifest bytes (no byte-order mark yet) and the first line of each row."""
    out, lines, line = [], [], 1
    if not jsonl:
        out.append(f"id,file,s,d{newline}".encode())
        line = 2
    for row in rows:
        if isinstance(row, bytes):
            chunk = row + newline.encode()
        elif jsonl:
            chunk = json.dumps({k: v for k, v in row.items() if not k.startswith("_")}).encode() + newline.encode()
        else:
            values = [row[k] for k in ("id", "file", "s", "d") if k in row]
            # python's writer leaves a lone CR or LF unquoted unless it is in the line terminator
            quoting = csv.QUOTE_ALL if re.search("[\r\n]", "".join(values)) else csv.QUOTE_MINIMAL
            buf = io.StringIO()
            csv.writer(buf, lineterminator=newline, quoting=quoting).writerow(values)
            chunk = buf.getvalue().encode("utf-8", "surrogatepass")
        if isinstance(row, dict) and "_inject" in row:
            chunk = chunk.replace(b"@@INJ@@", row["_inject"])
        lines.append(line)
        line += len(_BREAK.findall(chunk))
        out.append(chunk)
    return b"".join(out), lines


def source(path: Path, root: Path, jsonl: bool, encoding: str = "auto", key: bool = True) -> ManifestSource:
    return ManifestSource(name="m", path=str(path), image_root=str(root / "images"), image_column="file",
                          key_column="id" if key else "", caption_columns={"short": "s", "dense": "d"},
                          optional_captions=("dense",), encoding=encoding)


# ---------------------------------------------------------------------------------- tests


@st.composite
def hostile_manifests(draw, jsonl: bool, root: Path):
    """``(valid samples, rows in file order, newline, byte-order mark)`` mixing valid and hostile rows."""
    samples = draw(valid_samples(jsonl, root))
    rows = []
    for s in samples:
        for r in s.rows():
            r["_owner"] = s
            rows.append(r)
    rows += [draw(hostile_row(i, jsonl, bad_paths(root))) for i in range(draw(st.integers(0, 8)))]
    rows = draw(st.permutations(rows))
    return samples, rows, draw(st.sampled_from(["\n", "\r\n", "\r"])), draw(st.sampled_from(["", "utf-8", "utf-16"]))


def check_mixed(root: Path, samples, rows, newline: str, bom: str, jsonl: bool) -> None:
    """Write the manifest, read and validate it, check every property of the module docstring."""
    data, lines = render(rows, jsonl, newline)
    if bom == "utf-8":
        data = b"\xef\xbb\xbf" + data
    elif bom == "utf-16":  # raw bytes injected into UTF-16 text: see the random-bytes test instead
        with contextlib.suppress(UnicodeDecodeError):
            data = data.decode("utf-8").encode("utf-16")
    with tempfile.TemporaryDirectory(dir=root) as work:
        work = Path(work)
        path = work / ("m.jsonl" if jsonl else "m.csv")
        path.write_bytes(data)
        (work / "out").mkdir()
        before = tree(root)
        kept, rejects, _ = _validate_all(iter_manifest(source(path, root, jsonl)), FIELDS, CFG, work / "out")
        assert changed_outside(before, tree(root), f"{work.name}/out") == []
    valid_lines = {n for n, r in zip(lines, rows, strict=True) if isinstance(r, dict) and "_owner" in r}
    for s in samples:
        key = make_key("m", str(s.ident))
        assert key in kept, f"valid sample {s.ident!r} lost: {[(r.reason, r.detail) for r in rejects]}"
        assert kept[key].captions == expected(s, rows)
        record("valid_checked")
    for rej in rejects:
        assert rej.reason in R.REASONS and rej.detail and rej.line in lines and rej.line not in valid_lines, rej
    hostile = [r for r in rows if not (isinstance(r, dict) and "_owner" in r)]
    assert len(kept) - len(samples) + len(rejects) <= len(hostile)


@fuzz()
@given(st.data())
def test_csv_valid_rows_survive_hostile_rows(root, data):
    samples, rows, newline, bom = data.draw(hostile_manifests(jsonl=False, root=root))
    check_mixed(root, samples, rows, newline, bom, jsonl=False)


@fuzz()
@given(st.data())
def test_jsonl_valid_rows_survive_hostile_rows(root, data):
    samples, rows, newline, bom = data.draw(hostile_manifests(jsonl=True, root=root))
    check_mixed(root, samples, rows, newline, bom, jsonl=True)


@pytest.mark.parametrize("path_index", range(15))
@pytest.mark.timeout(60)
def test_every_hostile_image_path_is_quarantined_with_its_line(root, path_index, tmp_path):
    """Each bad path (FIFO, /dev/zero, loops, folders, NUL, too long) -> a quarantine record, no hang."""
    bad = bad_paths(root)[path_index]
    rows = [{"id": "good", "file": "img1.jpg", "s": "a good caption", "d": ""},
            {"id": "bad", "file": bad, "s": "a caption for a bad path", "d": ""}]
    for jsonl in (False, True):
        data, lines = render(rows, jsonl, "\n")
        path = tmp_path / ("m.jsonl" if jsonl else "m.csv")
        path.write_bytes(data)
        kept, rejects, _ = _validate_all(iter_manifest(source(path, root, jsonl)), FIELDS, CFG, tmp_path)
        assert list(kept) == [make_key("m", "good")]
        assert [(r.reason in IMAGE_PROBLEMS, r.line) for r in rejects] == [(True, lines[1])], rejects


@fuzz()
@given(body=st.binary(max_size=2000), header=st.sampled_from([b"", b"id,file,s,d\n", b"\xef\xbb\xbfid,file,s,d\r\n"]),
       jsonl=st.booleans(), encoding=st.sampled_from(["auto", "utf-8", "cp1252", "latin-1", "utf-16", "shift_jis"]))
@example(body=b'h1,img0.jpg,"never closed\nv1,img1.jpg,a good caption,\n', header=b"id,file,s,d\n", jsonl=False,
         encoding="auto")
@example(body=b'"' + b"x" * 5000 + b"\nimg0.jpg,a caption\n", header=b"", jsonl=False, encoding="auto")  # giant header
def test_random_bytes_are_quarantined_or_a_clear_error(root, body, header, jsonl, encoding):
    """Any bytes at all: samples with reasons and lines, or one StageError; never another exception."""
    with tempfile.TemporaryDirectory(dir=root) as work:
        path = Path(work) / ("m.jsonl" if jsonl else "m.csv")
        path.write_bytes(body if jsonl else header + body)
        try:
            raws = list(iter_manifest(source(path, root, jsonl, encoding)))
        except StageError as err:
            assert str(err) and len(str(err)) < 2000
            record("StageError")
            return
        kept, rejects, _ = _validate_all(raws, FIELDS, CFG, Path(work))
    for rej in rejects:
        assert rej.reason in R.REASONS and isinstance(rej.line, int), rej


@fuzz(0.5)
@given(n_images=st.integers(1, 6), per_image=st.integers(1, 5), seed=st.randoms(use_true_random=False),
       newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_coco_layout_one_row_per_caption_without_key_column(root, n_images, per_image, seed, newline):
    """image,caption rows, ``per_image`` per image, shuffled: one sample per image, every caption kept."""
    rows = [{"file": f"img{j}.jpg", "s": f"caption {c} of image {j}", "d": ""}
            for j in range(n_images) for c in range(per_image)]
    seed.shuffle(rows)
    with tempfile.TemporaryDirectory(dir=root) as work:
        path = Path(work) / "m.csv"
        body = "".join(f"{r['file']},{r['s']},{newline}" for r in rows)
        path.write_bytes(f"file,s,d{newline}{body}".encode())
        kept, rejects, _ = _validate_all(iter_manifest(source(path, root, False, key=False)), FIELDS, CFG,
                                         Path(work))
    assert rejects == [] and len(kept) == n_images
    for j in range(n_images):
        want = [r["s"] for r in rows if r["file"] == f"img{j}.jpg"]
        assert kept[make_key("m", f"img{j}")].captions == {"short": want, "dense": []}
        record("valid_checked")


_PLAIN = st.text(alphabet=st.sampled_from(list("abc xyz 0129")), min_size=3, max_size=20).filter(
    lambda t: len(t.split()) and len(" ".join(t.split())) >= 3)


@fuzz(0.5)
@given(captions=st.lists(_PLAIN, min_size=1, max_size=8), at=st.integers(0, 8),
       newline=st.sampled_from(["\n", "\r\n", "\r"]))
@example(captions=["a good caption", "another one"], at=0, newline="\n")
def test_an_unclosed_quote_swallows_no_valid_row(root, captions, at, newline):
    """A quoted field never closed before the end of the file is quarantined; the rows after it are read."""
    lines = [f"v{i},img{i % N_IMAGES}.jpg,{c}," for i, c in enumerate(captions)]
    at = min(at, len(lines))
    lines.insert(at, 'bad,img0.jpg,"never closed,')
    with tempfile.TemporaryDirectory(dir=root) as work:
        path = Path(work) / "m.csv"
        path.write_bytes(newline.join(["id,file,s,d", *lines, ""]).encode())
        kept, rejects, _ = _validate_all(iter_manifest(source(path, root, False)), FIELDS, CFG, Path(work))
    assert sorted(kept) == sorted(make_key("m", f"v{i}") for i in range(len(captions)))
    for i, c in enumerate(captions):
        assert kept[make_key("m", f"v{i}")].captions["short"] == [" ".join(c.split())]
        record("valid_checked")
    assert [(r.reason, r.line) for r in rejects] == [(R.BAD_METADATA, at + 2)]


def test_json_nested_deeper_than_the_recursion_limit_is_a_bad_row(root, tmp_path):
    """``[[[[...`` 100 000 deep: a RecursionError in json.loads, quarantined like any bad JSON line."""
    data, lines = render([{"id": "good", "file": "img1.jpg", "s": "a good caption", "d": ""}, DEEP_JSON], True, "\n")
    (tmp_path / "m.jsonl").write_bytes(data)
    kept, rejects, _ = _validate_all(iter_manifest(source(tmp_path / "m.jsonl", root, True)), FIELDS, CFG, tmp_path)
    assert list(kept) == [make_key("m", "good")]
    assert [(r.reason, r.line) for r in rejects] == [(R.BAD_METADATA, 2)]


def test_an_image_file_over_the_size_limit_is_not_read(root, tmp_path, monkeypatch):
    """A local image larger than MAX_FILE_BYTES is quarantined from its size, never read into memory."""
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)
    rows = [{"id": "big", "file": "img1.jpg", "s": "a good caption", "d": ""}]
    (tmp_path / "m.csv").write_bytes(render(rows, False, "\n")[0])
    (raw,) = iter_manifest(source(tmp_path / "m.csv", root, False))
    assert raw.error[0] == R.MISSING_IMAGE and "more than 1000" in raw.error[1] and raw.image is None


@pytest.mark.parametrize("jsonl", [False, True])
def test_unicode_line_breaks_in_a_rejected_path_keep_one_quarantine_line(root, tmp_path, jsonl):
    """U+2028, U+2029 and U+0085 (raw in json.dumps output) never split a quarantine.jsonl record."""
    rows = [{"id": "good", "file": "img1.jpg", "s": "a good caption", "d": ""},
            {"id": "bad", "file": "a\u2028b\x85c\u2029.jpg", "s": "a caption", "d": ""}]
    (tmp_path / "m.x").write_bytes(render(rows, jsonl, "\n")[0])
    path = tmp_path / ("m.jsonl" if jsonl else "m.csv")
    (tmp_path / "m.x").rename(path)
    kept, rejects, _ = _validate_all(iter_manifest(source(path, root, jsonl)), FIELDS, CFG, tmp_path)
    assert len(kept) == 1 and [r.line for r in rejects] == [2 if jsonl else 3]
    (line,) = (tmp_path / "quarantine.jsonl").read_text("utf-8").splitlines()
    assert "\u2028" in json.loads(line)["source_id"]


@pytest.mark.parametrize("name", ["nul\x00.csv", "loop.csv", "x" * 5000 + ".csv", "fifo.csv", "folder"])
def test_a_manifest_path_that_cannot_be_read_is_a_stage_error(tmp_path, name):
    """A NUL, a symlink loop, a name too long, a FIFO, a folder: one StageError naming the source."""
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "folder").mkdir()
    src = ManifestSource(name="m", path=str(tmp_path / name))
    with pytest.raises(StageError, match="source 'm'"):
        list(iter_manifest(src))
