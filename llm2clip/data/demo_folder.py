"""A tiny ImageNet-style labelled image folder of the demo's shape classes.

It exercises the labelled-folder path (the ``imagenet`` source kind, zero-shot classification)
without the real ImageNet. The layout is exactly the ImageNet-1k one that source reads::

    DST/LOC_synset_mapping.txt          n90000001 circle  (one line per class, sorted)
    DST/val/n90000001/ILSVRC2012_val_00000001.JPEG
    ...

The wnids are made up (``n9000000k``, one per shape class in sorted order). Every picture is a
synthetic scene (:mod:`llm2clip.data.synthetic`) whose counted group is the class's shape and
whose other object is another shape, so the label is the only shape class in the picture and
the demo model's zero-shot accuracy on it means something. Deterministic by seed.

The folder is written into a temp folder next to ``DST`` and renamed onto it at the end, so
``DST`` is either absent or complete; a rerun with the same settings leaves a complete folder
alone, other settings (or a partial folder left by an older writer) replace it.

CLI: ``python -m llm2clip.data.demo_folder DST [--per-class N] [--image-size PX] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llm2clip.data.synthetic import SHAPES, class_scene, render
from llm2clip.io import StageError

SYNSET_MAPPING = "LOC_synset_mapping.txt"
SPLIT = "val"
MARKER = ".demo_folder.json"  # written last: what this folder holds, proof that it is complete
JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoFolder:
    """What :func:`write_imagenet_folder` left at ``path``; ``written`` is False for a no-op."""

    path: Path
    classes: int
    images: int
    written: bool

    def summary(self) -> str:
        """One line for the CLI."""
        done = "wrote" if self.written else "already complete:"
        return f"{done} {self.classes} classes, {self.images} images, ImageNet layout at {self.path}"


def wnids() -> dict[str, str]:
    """Shape class -> made-up wnid, in sorted class order (``circle`` -> ``n90000001``)."""
    return {shape: f"n{90000001 + i}" for i, shape in enumerate(sorted(SHAPES))}


def write_imagenet_folder(dst: str | os.PathLike, *, per_class: int = 8, image_size: int = 96,
                          seed: int = 0) -> DemoFolder:
    """Write (or keep) the demo ImageNet-style folder at ``dst``.

    Args:
        dst: The folder to create; its parent is created when missing.
        per_class: Images per shape class.
        image_size: Side of the square pictures in pixels.
        seed: Same seed, same pictures (byte for byte).

    Raises:
        StageError: bad sizes, or ``dst`` exists and holds something other than a demo folder
            (it is never deleted then).
    """
    if per_class < 1 or image_size < 32:
        raise StageError(f"demo folder: per_class must be >= 1 and image_size >= 32 "
                         f"(got {per_class}, {image_size})")
    dst = Path(os.path.abspath(dst))  # "." or "out/" have a name to put the temp folder beside
    classes = wnids()
    settings = {"classes": classes, "per_class": per_class, "image_size": image_size, "seed": seed}
    result = DemoFolder(dst, len(classes), len(classes) * per_class, written=False)
    if _complete(dst, settings, result.images):
        return result
    if dst.exists():
        _check_replaceable(dst)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dst.with_name(f".{dst.name}.partial"), dst.with_name(f".{dst.name}.old")
    for leftover in (tmp, old):  # from a run that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    _write(tmp, classes, per_class, image_size, seed)
    (tmp / MARKER).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if dst.exists():  # an incomplete folder or other settings: swap, then drop the old one
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return DemoFolder(dst, result.classes, result.images, written=True)


def _write(root: Path, classes: dict[str, str], per_class: int, image_size: int, seed: int) -> None:
    lines = [f"{wnid} {shape}\n" for shape, wnid in sorted(classes.items(), key=lambda kv: kv[1])]
    (root / SYNSET_MAPPING).write_text("".join(lines))
    number = 0
    for shape, wnid in sorted(classes.items(), key=lambda kv: kv[1]):
        folder = root / SPLIT / wnid
        folder.mkdir(parents=True)
        rng = random.Random(f"{seed}/demo_folder/{shape}")  # a class's pictures do not depend on the others
        for _ in range(per_class):
            number += 1
            image = render(class_scene(shape, rng), image_size, rng)
            image.save(folder / f"ILSVRC2012_{SPLIT}_{number:08d}.JPEG", "JPEG", quality=JPEG_QUALITY)


def _complete(dst: Path, settings: dict, images: int) -> bool:
    """True when ``dst`` is a finished demo folder written with ``settings``."""
    try:
        recorded = json.loads((dst / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == settings and sum(1 for _ in (dst / SPLIT).glob("*/*.JPEG")) == images


def _check_replaceable(dst: Path) -> None:
    """Only a demo folder (complete or not) or an empty folder may be replaced."""
    if not dst.is_dir():
        raise StageError(f"demo folder: {dst} exists and is not a folder; choose another path")
    foreign = sorted(p.name for p in dst.iterdir() if p.name not in (SYNSET_MAPPING, SPLIT, MARKER))
    if foreign:
        raise StageError(f"demo folder: {dst} exists and holds other files ({', '.join(foreign[:3])}); "
                         "choose a new or empty folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm2clip.data.demo_folder",
        description="Write a tiny ImageNet-style labelled folder of the demo's shape classes.",
    )
    parser.add_argument("dst", help="folder to write (LOC_synset_mapping.txt + val/<wnid>/*.JPEG)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    parser.add_argument("--image-size", type=int, default=96, help="picture side in pixels (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        folder = write_imagenet_folder(args.dst, per_class=args.per_class, image_size=args.image_size,
                                       seed=args.seed)
    except StageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(folder.summary() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
