"""prepare_data end to end on a hostile mix: every input class at once, through ``prepare_data.run``.

A CSV manifest (one row per caption, an optional column mostly empty, FIFO / ``/dev/zero`` /
traversal / NUL image paths, undecodable bytes, a quote never closed), a JSONL manifest (CR line
ends, a ``"\\ud800"`` path, JSON nested too deep) and a webdataset shard (symlinks and hard links
pointing outside, ``../`` and absolute and non-UTF-8 member names, a decompression bomb, a text
member that is not UTF-8). Properties: the stage finishes; every valid sample is in the shards
with all its captions; every hostile one is in ``quarantine.jsonl`` with a reason and its line or
member; nothing is written outside the output folder; a mix with too few valid samples is one
clear ``StageError``. Profiles: see ``test_fuzz_support``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import bad_inputs as B
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_support import TIMEOUT, changed_outside, fuzz, record, tree
from test_fuzz_tar import IMAGES, build_tar, hostile_group, valid_group

from llm2clip.config import CommonConfig, ManifestSource, PrepareDataConfig, ValidationConfig, WebDatasetSource
from llm2clip.data import records as R
from llm2clip.data.records import KEY_PATTERN, make_key
from llm2clip.data.shards import iter_samples, load_manifest
from llm2clip.io import StageError
from llm2clip.stages import prepare_data

COMMON = CommonConfig(tracking=False, seed=0)
OUTPUT_NAMES = re.compile(r"^(manifest\.json|quarantine\.jsonl|validation(/.*)?|(train|val)-\d{6}\.tar)$")


def stage(sources, min_valid: float = 0.2) -> PrepareDataConfig:
    return PrepareDataConfig(sources=tuple(sources), val_fraction=0.3, shard_size=8, image_max_side=48,
                             validation=ValidationConfig(min_valid_fraction=min_valid))


def csv_source(root: Path) -> tuple[ManifestSource, dict[str, list[str]], set[int]]:
    """The hostile CSV; returns the source, the valid samples' short captions and the hostile lines."""
    img = root / "images"
    img.mkdir()
    for j in range(4):
        (img / f"c{j}.jpg").write_bytes(B.good_jpeg(64, 48, seed=10 + j))
    (img / "text.jpg").write_bytes(B.not_an_image())
    os.mkfifo(img / "fifo.jpg")
    rows = [b"file,caption,dense"]
    for j in range(4):  # COCO style: three rows per image; dense only on the first; UTF-8 (so not cp1252)
        rows += [f"c{j}.jpg,caption {k} of picture {j} \u00e0 la carte,{'a dense one' if k == 0 else ''}".encode()
                 for k in range(3)]
    hostile = [b"fifo.jpg,a fifo,", b"/dev/zero,endless zeros,", b"../../../../../../etc/passwd,traversal,",
               b"text.jpg,a text file,", b"c1.jpg\x00,nul in the path,", b"c2.jpg,bytes \xff\xfe not utf-8,",
               b'c3.jpg,"a quote never closed,']
    path = root / "m.csv"
    path.write_bytes(b"\r\n".join(rows + hostile) + b"\r\n")
    captions = {f"c{j}": [f"caption {k} of picture {j} \u00e0 la carte" for k in range(3)] for j in range(4)}
    lines = set(range(len(rows) + 1, len(rows) + len(hostile) + 1))
    return (ManifestSource(name="csv", path=str(path), image_root=str(img), image_column="file", caption_columns={
        "short": "caption", "dense": "dense"}, optional_captions=("dense",)), captions, lines)


def jsonl_source(root: Path) -> tuple[ManifestSource, dict[str, list[str]], set[int]]:
    (root / "j0.png").write_bytes(B.encode(B.noise_rgb(50, 40, seed=7), "PNG"))
    lines = [json.dumps({"id": "j0", "image": "j0.png", "short": ["one short caption", "another short"]}),
             json.dumps({"id": "j1", "image": "\ud800.jpg", "short": "a surrogate in the path"}),
             "[" * 50_000, json.dumps({"id": 0, "image": "j0.png", "short": "id zero is an id"})]
    path = root / "m.jsonl"
    path.write_bytes("\r".join(lines).encode())
    src = ManifestSource(name="jsonl", path=str(path), key_column="id", caption_columns={"short": "short",
                                                                                        "dense": "dense"},
                         optional_captions=("dense",))
    return src, {"j0": ["one short caption", "another short"], "0": ["id zero is an id"]}, {2, 3}


def shard_source(root: Path, victim: Path) -> tuple[WebDatasetSource, dict[str, list[str]], set[str]]:
    buf = io.BytesIO()
    members = [("w0.jpg", IMAGES[0]), ("w0.txt", b"a webdataset caption"), ("../../up.jpg", IMAGES[1]),
               ("../../up.txt", b"a caption up the tree"), ("/abs/x.jpg", IMAGES[2]), ("/abs/x.txt", b"absolute name"),
               ("s.jpg", str(victim)), ("s.txt", b"a symlink"), ("h.jpg", "w0.jpg"), ("h.txt", b"a hard link"),
               ("bomb.png", B.png_header_only(90_000, 90_000)), ("bomb.txt", b"a bomb"),
               ("\udcffname.jpg", IMAGES[3]), ("\udcffname.txt", b"a name that is not utf-8"),
               ("enc.jpg", IMAGES[0]), ("enc.txt", b"latin-1 caf\xe9")]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = (tarfile.SYMTYPE if name == "s.jpg" else tarfile.LNKTYPE), data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "shard.tar").write_bytes(buf.getvalue())
    src = WebDatasetSource(name="wds", urls=str(root / "shard.tar"), caption_fields={"short": "txt",
                                                                                     "dense": "json:dense"},
                           optional_captions=("dense",))
    valid = {"w0": ["a webdataset caption"], "../../up": ["a caption up the tree"], "/abs/x": ["absolute name"],
             "\udcffname": ["a name that is not utf-8"]}
    return src, valid, {"s", "h", "bomb", "enc"}


def read_output(out: Path) -> tuple[dict[str, dict], list[dict]]:
    """``({key: json meta}, quarantine records)``; checks the folder holds only the stage's files."""
    names = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert all(OUTPUT_NAMES.match(n) for n in names), names
    manifest = load_manifest(str(out))
    samples = {}
    for split in ("train", "val"):
        for s in iter_samples(str(out), split, manifest=manifest, decode=False):
            assert re.match(KEY_PATTERN, s.key) and s.key not in samples
            samples[s.key] = s.meta
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert all(re.match(r"^[A-Za-z0-9_-]+\.(jpg|json)$", m.name) and m.isfile() for m in tar)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text("utf-8").splitlines()]
    record(*["kept"] * len(samples), *(q["reason"] for q in quarantine))
    return samples, quarantine


@pytest.mark.timeout(120)
def test_stage_on_a_hostile_mix_keeps_every_valid_sample(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (tmp_path / "victim.jpg").write_bytes(IMAGES[0])
    csv_src, csv_valid, csv_bad = csv_source(inputs)
    jsonl_src, jsonl_valid, jsonl_bad = jsonl_source(inputs)
    wds_src, wds_valid, wds_bad = shard_source(inputs, tmp_path / "victim.jpg")
    before, out = tree(tmp_path), tmp_path / "work" / "out"
    result = prepare_data.run(stage([csv_src, jsonl_src, wds_src]), COMMON, data=str(out))
    assert changed_outside(before, tree(tmp_path), "work") == [] and os.listdir(tmp_path / "work") == ["out"]
    samples, quarantine = read_output(out)
    for name, valid in (("csv", csv_valid), ("jsonl", jsonl_valid), ("wds", wds_valid)):
        for raw_id, short in valid.items():
            key = make_key(name, raw_id)
            assert key in samples, f"{name} {raw_id!r} lost; quarantine: {quarantine}"
            assert samples[key]["captions"]["short"] == short
            record("valid_checked")
    assert samples[make_key("csv", "c0")]["captions"]["dense"] == ["a dense one"]
    assert all(q["reason"] in R.REASONS and q["detail"] for q in quarantine)
    assert {q["line"] for q in quarantine if q["source"] == "csv"} == csv_bad
    assert {q["line"] for q in quarantine if q["source"] == "jsonl"} == jsonl_bad
    assert {q["source_id"].rsplit("#", 1)[-1] for q in quarantine if q["source"] == "wds"} == wds_bad
    assert result.quarantined == len(quarantine) == len(csv_bad) + len(jsonl_bad) + len(wds_bad)


@fuzz(0.1)
@given(data=st.data())
@pytest.mark.timeout(TIMEOUT)
def test_stage_on_a_fuzzed_shard(data):
    """A random mix of valid and hostile samples: the stage keeps every valid one, writes only under out/."""
    groups = [data.draw(valid_group(i)) for i in range(data.draw(st.integers(2, 5)))]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        groups += [data.draw(hostile_group(i, str(root / "victim.jpg"))) for i in range(data.draw(st.integers(0, 4)))]
        groups = data.draw(st.permutations(groups))
        (root / "victim.jpg").write_bytes(IMAGES[0])
        (root / "shard.tar").write_bytes(build_tar(groups, tarfile.PAX_FORMAT, []))
        src = WebDatasetSource(name="w", urls=str(root / "shard.tar"),
                               caption_fields={"short": "txt", "dense": "json:dense"}, optional_captions=("dense",))
        before = tree(root)
        prepare_data.run(stage([src], min_valid=0.0), COMMON, data=str(root / "out"))
        assert changed_outside(before, tree(root), "out") == []
        samples, quarantine = read_output(root / "out")
    duplicates = {q["key"] for q in quarantine if q["reason"] == R.DUPLICATE}  # same image and captions
    assert all(q["detail"].split()[5] in samples for q in quarantine if q["reason"] == R.DUPLICATE)
    for g in (g for g in groups if g.valid and make_key("w", g.key) not in duplicates):
        assert samples[make_key("w", g.key)]["captions"] == {"short": g.short, "dense": g.dense}
        record("valid_checked")
    assert len(samples) + len(quarantine) >= len(groups)


@pytest.mark.timeout(120)
def test_too_few_valid_samples_is_one_clear_stage_error(tmp_path):
    """All rows hostile: a StageError with the numbers and the quarantine file, no manifest.json."""
    (tmp_path / "m.csv").write_bytes(b"image,caption\n/dev/zero,zeros\nnowhere.jpg,gone\nx\x00.jpg,nul\n")
    src = ManifestSource(name="bad", path=str(tmp_path / "m.csv"))
    cfg = PrepareDataConfig(sources=(src,), validation=ValidationConfig(min_captions=1))
    with pytest.raises(StageError, match=r"only 0 of 3 samples .*/quarantine\.jsonl"):
        prepare_data.run(cfg, CommonConfig(tracking=False, caption_fields=("short",)), data=str(tmp_path / "out"))
    record("StageError")
    assert not (tmp_path / "out" / "manifest.json").exists()
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert reasons == [R.MISSING_IMAGE] * 3
