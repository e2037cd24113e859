"""``prepare_data`` sources that read public benchmarks in their standard on-disk layouts.

One dataclass per kind; the readers live in :mod:`llm2clip.data.benchmarks`. Every path may be
local or ``s3://``. Each kind gives at most one caption field (``caption_field``; ImageNet none),
so an evaluation set built from it has ``caption_fields: [<that field>]`` (ImageNet: ``[]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from llm2clip.config.base import ConfigError

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _check_name(where: str, caption_field: str) -> None:
    if not caption_field:
        raise ConfigError(f"{where}.caption_field: must name the output caption field (e.g. captions)")


@dataclass(frozen=True)
class KarpathySource:
    """COCO or Flickr30k through Karpathy & Fei-Fei's split file (``dataset_coco.json`` /
    ``dataset_flickr30k.json``, CVPR 2015), the split used by CLIP, CLIP_benchmark and LAVIS.

    Layout: ``{"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
    "imgid": 0, "split": "test", "cocoid": 391895, "sentences": [{"raw": "A man ..."}, ...]}]}``;
    Flickr30k entries have no ``filepath``. The test split is 5k images (COCO) / 1k (Flickr30k).

    Attributes:
        name: Source name; sample keys are ``<name>-<cocoid | imgid | file name stem>``.
        path: The split JSON.
        image_root: Folder of the images: an image is ``image_root/filepath/filename`` (COCO:
            the folder holding ``val2014/``), or ``image_root/filename`` without ``filepath``
            (Flickr30k: the ``flickr30k-images`` folder). Empty: the JSON's folder.
        split: Karpathy split to read: ``train``, ``restval``, ``val`` or ``test``.
        caption_field: Output caption field the sentences go into.
        max_captions: Captions kept per image, in file order: 5 is the standard protocol
            (COCO 5k/25k, Flickr30k 1k/5k; a few COCO images have 6 or 7); 0 keeps all.
    """

    kind: Literal["karpathy"] = "karpathy"
    name: str = "karpathy"
    path: str = ""
    image_root: str = ""
    split: str = "test"
    caption_field: str = "captions"
    max_captions: int = 5

    def __post_init__(self) -> None:
        where = f"karpathy source {self.name!r}"
        _check_name(where, self.caption_field)
        if self.split not in KARPATHY_SPLITS:
            raise ConfigError(f"{where}.split: must be one of {list(KARPATHY_SPLITS)}, got {self.split!r}")
        if self.max_captions < 0:
            raise ConfigError(f"{where}.max_captions: must be >= 0 (0 keeps all), got {self.max_captions}")


@dataclass(frozen=True)
class LongCaptionSource:
    """A long-caption retrieval set: one long caption per image.

    Layouts:
        ``sharegpt4v``: the ShareGPT4V JSON (Chen et al. 2023), a list of ``{"id", "image":
        "sam/images/sa_545504.jpg", "conversations": [{"from": "human", ...}, {"from": "gpt",
        "value": <caption>}]}``; the caption is the first ``gpt`` turn. ShareGPT4V-1k (Long-CLIP,
        LLM2CLIP) is its first 1000 entries.
        ``urban1k``: the Urban1k folder (Long-CLIP): ``image/<n>.jpg`` + ``caption/<n>.txt``.
        ``docci``: ``docci_descriptions.jsonlines`` (Onoe et al. 2024), one ``{"example_id",
        "split", "image_file", "description"}`` per line, images in ``images/``.

    Attributes:
        name: Source name; keys are ``<name>-<id | stem | example_id>``.
        layout: ``sharegpt4v``, ``urban1k`` or ``docci``.
        path: The JSON (sharegpt4v), the ``Urban1k`` folder, or the ``.jsonlines`` file (docci).
        image_root: Image folder; empty: the layout's default (sharegpt4v: the JSON's folder,
            urban1k: ``<path>/image``, docci: ``images/`` next to the file).
        caption_field: Output caption field of the long caption.
        split: docci only: the ``split`` value to keep (``test``; empty: every line).
        limit: First N images (file order; urban1k: by number); 0: all; -1: the layout's
            standard set (1000 for sharegpt4v, all for urban1k and docci).
    """

    kind: Literal["long_caption"] = "long_caption"
    name: str = "long_caption"
    layout: Literal["sharegpt4v", "urban1k", "docci"] = "sharegpt4v"
    path: str = ""
    image_root: str = ""
    caption_field: str = "long"
    split: str = "test"
    limit: int = -1

    def __post_init__(self) -> None:
        where = f"long_caption source {self.name!r}"
        _check_name(where, self.caption_field)
        if self.limit < -1:
            raise ConfigError(f"{where}.limit: must be -1 (the layout's standard), 0 (all) or N, got {self.limit}")

    @property
    def resolved_limit(self) -> int:
        """How many images to take (0: all)."""
        if self.limit >= 0:
            return self.limit
        return 1000 if self.layout == "sharegpt4v" else 0


@dataclass(frozen=True)
class ImageNetSource:
    """ImageNet-1k style labelled images (no captions; ``label`` = class name) for zero-shot eval.

    Layouts:
        ``folders``: ``<path>/<wnid>/*.JPEG`` (e.g. ``val/n01440764/ILSVRC2012_val_00000293.JPEG``,
        the torchvision ``ImageFolder`` layout); any folder names work.
        ``val_csv``: the ILSVRC localisation files as on Kaggle: ``LOC_val_solution.csv``
        (``ImageId,PredictionString``; the first token of the prediction is the wnid) with the
        images flat in ``ILSVRC/Data/CLS-LOC/val/<ImageId>.JPEG``.

    Class names: from ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``: the first
    comma-separated name), or from ``classnames_file``, one name per line in sorted-wnid order:
    how the curated OpenAI CLIP class names (which the paper's zero-shot numbers use) are plugged
    in. Without either, the folder names / wnids are the class names.

    Attributes:
        name: Source name; keys are ``<name>-<wnid>-<image stem>``.
        layout: ``folders`` or ``val_csv``.
        path: The class-folder root (folders) or ``LOC_val_solution.csv`` (val_csv).
        image_root: val_csv only: the flat image folder; empty: ``ILSVRC/Data/CLS-LOC/val``
            next to the CSV.
        synset_mapping: ``LOC_synset_mapping.txt``; empty: that file next to ``path`` when it
            exists (none: folder names / wnids are the class names).
        classnames_file: One class name per line, in sorted-wnid order (wnids of the synset
            mapping, else of the data); wins over the synset mapping's names.
        limit_per_class: First N images per class (sorted by file name); 0: all.
    """

    kind: Literal["imagenet"] = "imagenet"
    name: str = "imagenet"
    layout: Literal["folders", "val_csv"] = "folders"
    path: str = ""
    image_root: str = ""
    synset_mapping: str = ""
    classnames_file: str = ""
    limit_per_class: int = 0

    def __post_init__(self) -> None:
        if self.limit_per_class < 0:
            raise ConfigError(f"imagenet source {self.name!r}.limit_per_class: must be >= 0 (0: all)")


@dataclass(frozen=True)
class CaptionTableSource:
    """Image + caption rows in a table: cross-lingual sets in the COCO-CN / Flickr30k-CN style.

    E.g. Flickr30k-CN (Lan et al. 2017): header-less TSV lines ``1000092795.jpg#zhc#0<TAB>两个年轻人...``
    (``image_column: 0``, ``caption_column: 1``, ``image_pattern: '^(?P<image>[^#]+)#'``); COCO-CN
    (Li et al. 2019): ids ``COCO_val2014_000000xxxxxx`` (``image_suffix: .jpg``) and a split file
    ``coco-cn_test.txt`` (``ids_file``). Rows of one image merge into one sample, captions in
    file order.

    Attributes:
        name: Source name; keys are ``<name>-<image id without extension>``.
        path: The ``.tsv`` / ``.csv`` / ``.jsonl`` file (UTF-8).
        format: ``tsv``, ``csv`` or ``jsonl``; empty: from the file's extension (``.txt``: tsv).
        header: The first tsv/csv line names the columns (jsonl: keys are the columns).
        image_column: Column with the image: a name, or a 0-based index without a header.
        caption_column: Column with the caption (a jsonl value may be a list of captions).
        image_pattern: Regex with a named group ``image`` applied to the image value; empty:
            the whole value is the image id.
        image_suffix: Appended to an image id without an extension (``.jpg``).
        ids_file: Optional split file, one image id per line (with or without extension); rows
            of other images are skipped.
        image_root: Folder of the images; empty: the table's folder.
        caption_field: Output caption field (e.g. ``zh``).
    """

    kind: Literal["caption_table"] = "caption_table"
    name: str = "caption_table"
    path: str = ""
    format: Literal["", "tsv", "csv", "jsonl"] = ""
    header: bool = True
    image_column: str | int = "image"
    caption_column: str | int = "caption"
    image_pattern: str = ""
    image_suffix: str = ""
    ids_file: str = ""
    image_root: str = ""
    caption_field: str = "caption"

    def __post_init__(self) -> None:
        where = f"caption_table source {self.name!r}"
        _check_name(where, self.caption_field)
        for attr in ("image_column", "caption_column"):
            value = getattr(self, attr)
            if isinstance(value, int) and (self.header or self.table_format == "jsonl" or value < 0):
                raise ConfigError(f"{where}.{attr}: a column index ({value}) needs a header-less tsv/csv "
                                  "(header: false); with a header or jsonl give the column name")
            if isinstance(value, str) and not self.header and self.table_format != "jsonl":
                raise ConfigError(f"{where}.{attr}: without a header give a 0-based column index, got {value!r}")
        if self.image_pattern:
            try:
                pattern = re.compile(self.image_pattern)
            except re.error as err:
                raise ConfigError(f"{where}.image_pattern: not a valid regex ({err})") from None
            if "image" not in pattern.groupindex:
                raise ConfigError(f"{where}.image_pattern: needs a named group (?P<image>...), got "
                                  f"{self.image_pattern!r}")

    @property
    def table_format(self) -> str:
        """``tsv``, ``csv`` or ``jsonl`` (``format``, else from the file's extension)."""
        if self.format:
            return self.format
        lower = self.path.lower()
        if lower.endswith((".jsonl", ".jsonlines", ".ndjson", ".json")):
            return "jsonl"
        return "csv" if lower.endswith(".csv") else "tsv"


BenchmarkSource = KarpathySource | LongCaptionSource | ImageNetSource | CaptionTableSource
