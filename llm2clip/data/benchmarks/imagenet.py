"""ImageNet-1k style labelled images (Russakovsky et al. 2015) for zero-shot classification.

No captions: each sample's ``label`` is its class name. Two layouts:

``folders`` (torchvision ``ImageFolder``, the usual ``val/`` after the valprep script)::

    val/n01440764/ILSVRC2012_val_00000293.JPEG
    val/n01443537/...

``val_csv`` (the ILSVRC localisation release, as on Kaggle)::

    LOC_val_solution.csv              ImageId,PredictionString
                                      ILSVRC2012_val_00000001,n01751748 65 62 500 375 n01751748 ...
    LOC_synset_mapping.txt            n01440764 tench, Tinca tinca
    ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG

Class names come from ``LOC_synset_mapping.txt`` (the first comma-separated name), or from a
``classnames_file`` with one name per line in sorted-wnid order. The latter is how the curated
OpenAI CLIP class names are used, which the paper's zero-shot numbers (like CLIP's) are based on.
Without either, the folder names are the class names.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator

from llm2clip.config.benchmarks import ImageNetSource
from llm2clip.data.benchmarks.files import image_sample, is_image, join, list_folder, parent, read_text, stem
from llm2clip.data.records import RawSample
from llm2clip.io import StageError, is_remote, s3_filesystem

log = logging.getLogger(__name__)

SYNSET_MAPPING = "LOC_synset_mapping.txt"
FOLDERS = "class folders <path>/<wnid>/<image>.JPEG (e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG)"
VAL_CSV = ("LOC_val_solution.csv with the header ImageId,PredictionString and rows "
           "'ILSVRC2012_val_00000001,n01751748 65 62 500 375 ...', images in ILSVRC/Data/CLS-LOC/val/")
MAPPING = f"{SYNSET_MAPPING}: lines 'n01440764 tench, Tinca tinca'"

Item = tuple[str, str, str]  # (wnid, image path, image stem)


def _exists(path: str, endpoint_url: str) -> bool:
    return s3_filesystem(endpoint_url).isfile(path) if is_remote(path) else os.path.isfile(path)


def _mapping_path(src: ImageNetSource, endpoint_url: str) -> str:
    """The synset mapping to read ("" for none): the configured one, else one next to ``path``."""
    if src.synset_mapping:
        return src.synset_mapping
    default = join(parent(src.path.rstrip("/")), SYNSET_MAPPING)
    return default if _exists(default, endpoint_url) else ""


def read_synsets(path: str, endpoint_url: str, source: str) -> dict[str, str]:
    """``{wnid: first name}`` of a ``LOC_synset_mapping.txt``.

    Raises:
        StageError: missing file, or a line that is not ``<wnid> <names>``.
    """
    synsets = {}
    for n, line in enumerate(read_text(path, endpoint_url, source, MAPPING).splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if not names.strip():
            raise StageError(f"{path}:{n}: {line.strip()!r} has no class name; expected {MAPPING}")
        synsets[wnid] = names.split(",")[0].strip()
    return synsets


def _folder_items(src: ImageNetSource, endpoint_url: str) -> list[Item]:
    classes = [n for n, is_dir in list_folder(src.path, endpoint_url, src.name, FOLDERS) if is_dir]
    if not classes:
        raise StageError(f"source {src.name!r}: {src.path} has no class folders; expected {FOLDERS}")
    items = []
    for wnid in classes:
        folder = join(src.path, wnid)
        names = [n for n, is_dir in list_folder(folder, endpoint_url, src.name, FOLDERS) if not is_dir and is_image(n)]
        items += [(wnid, join(folder, n), stem(n)) for n in names[: src.limit_per_class or None]]
    return items


def _csv_items(src: ImageNetSource, endpoint_url: str) -> list[Item]:
    rows = csv.reader(io.StringIO(read_text(src.path, endpoint_url, src.name, VAL_CSV), newline=""))
    header = next(rows, [])
    missing = [c for c in ("ImageId", "PredictionString") if c not in header]
    if missing:
        raise StageError(f"{src.path}: no column {missing[0]!r} in the header {header[:8]}; expected {VAL_CSV}")
    at_id, at_prediction = header.index("ImageId"), header.index("PredictionString")
    root = src.image_root or join(parent(src.path), "ILSVRC", "Data", "CLS-LOC", "val")
    per_class: dict[str, list[str]] = {}
    for n, row in enumerate(rows, start=2):
        if not row:
            continue
        tokens = row[at_prediction].split() if len(row) > max(at_id, at_prediction) else []
        if not tokens or not row[at_id]:
            raise StageError(f"{src.path}:{n}: no ImageId or no wnid in {row[:2]}; expected {VAL_CSV}")
        per_class.setdefault(tokens[0], []).append(row[at_id])
    items = []
    for wnid in sorted(per_class):
        ids = sorted(per_class[wnid])[: src.limit_per_class or None]
        items += [(wnid, join(root, f"{image_id}.JPEG"), image_id) for image_id in ids]
    return items


def class_names(src: ImageNetSource, wnids: list[str], endpoint_url: str) -> dict[str, str]:
    """``{wnid: class name}`` for every wnid of the data (see the module docstring).

    Raises:
        StageError: a wnid of the data is not in the synset mapping, or ``classnames_file`` does
            not have one line per wnid.
    """
    mapping_path = _mapping_path(src, endpoint_url)
    synsets = read_synsets(mapping_path, endpoint_url, src.name) if mapping_path else {}
    unknown = sorted(set(wnids) - set(synsets)) if synsets else []
    if unknown:
        raise StageError(f"source {src.name!r}: class {unknown[0]!r} ({len(unknown)} in all) is not in "
                         f"{mapping_path}; expected {MAPPING} covering every class of the data")
    universe = sorted(synsets or set(wnids))
    if not src.classnames_file:
        names = {w: synsets.get(w, w) for w in universe}
        shared = sorted(n for n, k in Counter(names.values()).items() if k > 1)
        if shared:  # ImageNet's first synset names: "crane" (bird, machine), "maillot" (twice)
            log.warning("source %r: classes share the names %s (zero-shot classes are the distinct labels, so "
                        "they merge); set classnames_file to distinct names, e.g. the OpenAI CLIP ones",
                        src.name, shared[:8])
        return names
    text = read_text(src.classnames_file, endpoint_url, src.name, "one class name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(universe):
        where = f"wnids of {mapping_path}" if synsets else "classes of the data"
        raise StageError(f"source {src.name!r}: {src.classnames_file} has {len(names)} class names, but "
                         f"the {len(universe)} {where} need one each, in sorted-wnid order")
    return dict(zip(universe, names, strict=True))


def open_imagenet(src: ImageNetSource, endpoint_url: str = "") -> tuple[Iterator[RawSample], int]:
    """List the images and resolve the class names now (layout errors surface here).

    Returns:
        ``(samples, count)``; keys are ``<name>-<wnid>-<image stem>``.

    Raises:
        StageError: a file or folder of the layout is missing, a CSV column or a class name.
    """
    items = _folder_items(src, endpoint_url) if src.layout == "folders" else _csv_items(src, endpoint_url)
    names = class_names(src, sorted({wnid for wnid, _, _ in items}), endpoint_url)
    samples = (image_sample(src.name, f"{wnid}-{image_stem}", path, endpoint_url, captions={}, label=names[wnid])
               for wnid, path, image_stem in items)
    return samples, len(items)
