"""The demo ImageNet-style folder: exact layout, counts, determinism, atomic (re)writes, CLI."""

from __future__ import annotations

import pytest
from PIL import Image

from llm2clip.data import demo_folder as D
from llm2clip.data.synthetic import SHAPES
from llm2clip.io import StageError

SMALL = {"per_class": 2, "image_size": 40}


def files(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_imagenet_val_with_class_folders(tmp_path):
    dst = tmp_path / "imagenet"
    folder = D.write_imagenet_folder(dst, per_class=3, image_size=48)
    assert (folder.classes, folder.images, folder.written) == (6, 18, True)

    lines = (dst / "LOC_synset_mapping.txt").read_text().splitlines()
    assert lines == [f"n9000000{i} {shape}" for i, shape in enumerate(sorted(SHAPES), start=1)]
    assert sorted(p.name for p in dst.iterdir()) == [".demo_folder.json", "LOC_synset_mapping.txt", "val"]
    wnids = [line.split()[0] for line in lines]
    assert sorted(p.name for p in (dst / "val").iterdir()) == wnids
    names = []
    for wnid in wnids:
        images = sorted((dst / "val" / wnid).iterdir())
        assert len(images) == 3
        for path in images:
            with Image.open(path) as im:
                assert (im.format, im.size, im.mode) == ("JPEG", (48, 48), "RGB")
            names.append(path.name)
    assert names == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 19)]
    assert not list(tmp_path.glob(".imagenet.*"))  # no temp folder left


def test_defaults_are_six_classes_of_eight_images_at_96px(tmp_path):
    folder = D.write_imagenet_folder(tmp_path / "d")
    assert (folder.classes, folder.images) == (6, 48)
    with Image.open(next((tmp_path / "d" / "val").glob("*/*.JPEG"))) as im:
        assert im.size == (96, 96)


def test_same_seed_same_bytes_other_seed_other_pictures(tmp_path):
    D.write_imagenet_folder(tmp_path / "a", **SMALL)
    D.write_imagenet_folder(tmp_path / "b", **SMALL)
    D.write_imagenet_folder(tmp_path / "c", **SMALL, seed=1)
    a, b, c = (files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() - {".demo_folder.json"} == c.keys() - {".demo_folder.json"} and a != c


def test_rerun_over_a_complete_folder_is_a_no_op(tmp_path):
    dst = tmp_path / "d"
    D.write_imagenet_folder(dst, **SMALL)
    stamp = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}
    again = D.write_imagenet_folder(dst, **SMALL)
    assert not again.written and again.summary().startswith("already complete: 6 classes, 12 images")
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")} == stamp


def test_other_settings_replace_the_folder(tmp_path):
    dst = tmp_path / "d"
    D.write_imagenet_folder(dst, **SMALL)
    folder = D.write_imagenet_folder(dst, per_class=3, image_size=40)
    assert folder.written and len(list((dst / "val").glob("*/*.JPEG"))) == 18
    assert not list(tmp_path.glob(".d.*"))


def test_partial_folder_and_leftover_temp_folders_are_replaced(tmp_path):
    dst = tmp_path / "d"
    D.write_imagenet_folder(tmp_path / "reference", **SMALL)
    # a crash left: a half-written temp folder, an old copy, and a dst without its marker
    (tmp_path / ".d.partial" / "val" / "n90000001").mkdir(parents=True)
    (tmp_path / ".d.partial" / "junk.JPEG").write_bytes(b"x")
    (tmp_path / ".d.old").mkdir()
    (dst / "val" / "n90000001").mkdir(parents=True)
    (dst / "LOC_synset_mapping.txt").write_text("n90000001 circle\n")
    (dst / "val" / "n90000001" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"half")

    assert D.write_imagenet_folder(dst, **SMALL).written
    assert files(dst) == files(tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "reference"]


def test_a_missing_image_makes_the_folder_incomplete(tmp_path):
    dst = tmp_path / "d"
    D.write_imagenet_folder(dst, **SMALL)
    next((dst / "val").glob("*/*.JPEG")).unlink()
    assert D.write_imagenet_folder(dst, **SMALL).written
    assert len(list((dst / "val").glob("*/*.JPEG"))) == 12


def test_a_crash_while_writing_leaves_no_destination(tmp_path, monkeypatch):
    dst = tmp_path / "d"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(D, "render", boom)
    with pytest.raises(RuntimeError):
        D.write_imagenet_folder(dst, **SMALL)
    assert not dst.exists()
    monkeypatch.undo()
    assert D.write_imagenet_folder(dst, **SMALL).written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_foreign_folder_is_never_replaced(tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "thesis.tex").write_text("precious")
    with pytest.raises(StageError, match=r"holds other files \(thesis.tex\)"):
        D.write_imagenet_folder(dst, **SMALL)
    assert (dst / "thesis.tex").read_text() == "precious"
    with pytest.raises(StageError, match="per_class"):
        D.write_imagenet_folder(tmp_path / "x", per_class=0)


def test_an_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "d").mkdir()
    assert D.write_imagenet_folder(tmp_path / "d", **SMALL).images == 12


def test_cli_prints_one_summary_line(tmp_path, capsys):
    assert D.main([str(tmp_path / "d"), "--per-class", "2", "--image-size", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"wrote 6 classes, 12 images, ImageNet layout at {tmp_path / 'd'}"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("")
    assert D.main([str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.startswith("error: demo folder:")
