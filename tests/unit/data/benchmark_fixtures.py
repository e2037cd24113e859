"""Tiny copies of the public benchmark layouts (file names, JSON keys, folders), written by the tests.

Each builder writes one set under ``root`` exactly as it is released (only fewer images, each a
distinct noise picture of 40x36 pixels) and returns what a test needs to point a source at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import bad_inputs as B

COCO_SENTENCES = [
    "A man with a red helmet on a small moped on a dirt road.",
    "Man riding a motor bike on a dirt road on the countryside.",
    "A man riding on the back of a motorcycle.",
    "A dirt path with a young person on a motor bike rests to the foreground.",
    "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    "A sixth caption some COCO images have.",
    "And a seventh one.",
]
_seed = iter(range(10_000))


def image(path: Path, w: int = 40, h: int = 36) -> Path:
    """A distinct small JPEG at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(B.good_jpeg(w, h, seed=next(_seed)))
    return path


def _sentences(raws: list[str], imgid: int, first_sentid: int) -> list[dict]:
    return [{"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": first_sentid + i}
            for i, raw in enumerate(raws)]


def karpathy_coco(root: Path, *, missing_image: bool = False) -> Path:
    """``dataset_coco.json`` + ``val2014/`` / ``train2014/``: 2 test images (7 and 5 sentences),
    one ``val``, one ``restval`` (and with ``missing_image`` a third test image not on disk)."""
    entries = [
        ("val2014", "COCO_val2014_000000391895.jpg", "test", 391895, COCO_SENTENCES),
        ("val2014", "COCO_val2014_000000522418.jpg", "test", 522418,
         [f"A woman cutting a large cake number {i}." for i in range(5)]),
        ("val2014", "COCO_val2014_000000184613.jpg", "val", 184613, ["A child holding a flowered umbrella."] * 5),
        ("train2014", "COCO_train2014_000000000009.jpg", "restval", 9, ["Closeup of bins of food."] * 5),
    ]
    if missing_image:
        entries.append(("val2014", "COCO_val2014_000000000042.jpg", "test", 42, ["A photo that is not there."] * 5))
    images = []
    for imgid, (folder, name, split, cocoid, raws) in enumerate(entries):
        if cocoid != 42:
            image(root / folder / name)
        sents = _sentences(raws, imgid, 5 * imgid)
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": name,
                       "imgid": imgid, "split": split, "sentences": sents, "cocoid": cocoid})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def karpathy_flickr(root: Path) -> Path:
    """``dataset_flickr30k.json`` (no ``filepath``, no ``cocoid``) + ``flickr30k-images/``."""
    images = []
    for imgid, (name, split) in enumerate([("1000092795.jpg", "test"), ("10002456.jpg", "train"),
                                           ("1007129816.jpg", "test")]):
        image(root / "flickr30k-images" / name)
        raws = [f"Caption {k} of image {name}." for k in range(5)]
        sents = _sentences(raws, imgid, 5 * imgid)
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents,
                       "split": split, "filename": name})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def sharegpt4v(root: Path) -> Path:
    """A ShareGPT4V JSON list of 3 entries (SAM, COCO, and one with no gpt turn)."""
    rows = [
        ("sa_545504", "sam/images/sa_545504.jpg", "The image shows a long street with old houses and trees."),
        ("000000000009", "coco/train2017/000000000009.jpg", "A lunch box with bread, broccoli and fruit."),
        ("sa_1", "sam/images/sa_1.jpg", None),
    ]
    data = []
    for id_, rel, caption in rows:
        image(root / rel)
        turns = [{"from": "human", "value": "<image>\nWhat do you see happening in this image?"}]
        if caption is not None:
            turns.append({"from": "gpt", "value": caption})
        data.append({"id": id_, "image": rel, "conversations": turns})
    path = root / "share-captioner_coco_lcs_sam_1246k_1107.json"
    path.write_text(json.dumps(data))
    return path


def urban1k(root: Path) -> Path:
    """``Urban1k/image/<n>.jpg`` + ``Urban1k/caption/<n>.txt`` for n = 1, 2, 10 (image 10 missing)."""
    base = root / "Urban1k"
    (base / "caption").mkdir(parents=True)
    for n in (1, 2, 10):
        if n != 10:
            image(base / "image" / f"{n}.jpg")
        (base / "caption" / f"{n}.txt").write_text(f"A busy city street number {n}, with cars and people.\n")
    return base


def docci(root: Path) -> Path:
    """``docci_descriptions.jsonlines`` (train, 2 test, qual_dev) + ``images/``."""
    lines = []
    for example in ("train_00001", "test_00001", "test_00002", "qual_dev_00001"):
        image(root / "images" / f"{example}.jpg")
        lines.append(json.dumps({"example_id": example, "split": example.rsplit("_", 1)[0],
                                 "image_file": f"{example}.jpg",
                                 "description": f"A detailed description of {example}, its objects and colours."}))
    path = root / "docci_descriptions.jsonlines"
    path.write_text("\n".join(lines) + "\n")
    return path


SYNSETS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
           "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"}


def synset_mapping(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {names}\n" for w, names in sorted(SYNSETS.items())))
    return path


def imagenet_folders(root: Path, *, mapping: bool = True) -> Path:
    """``val/<wnid>/ILSVRC2012_val_*.JPEG`` (tench 2, goldfish 1) and ``LOC_synset_mapping.txt``."""
    for wnid, ids in (("n01440764", (293, 2138)), ("n01443537", (236,))):
        for i in ids:
            image(root / "val" / wnid / f"ILSVRC2012_val_{i:08d}.JPEG")
    if mapping:
        synset_mapping(root / "LOC_synset_mapping.txt")
    return root / "val"


def imagenet_val_csv(root: Path) -> Path:
    """``LOC_val_solution.csv`` + ``LOC_synset_mapping.txt`` + ``ILSVRC/Data/CLS-LOC/val/`` (one image missing)."""
    rows = [("ILSVRC2012_val_00000003", "n01443537"), ("ILSVRC2012_val_00000001", "n01440764"),
            ("ILSVRC2012_val_00000002", "n01440764"), ("ILSVRC2012_val_00000004", "n01484850")]
    for image_id, _ in rows[:3]:
        image(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"{image_id}.JPEG")
    text = "ImageId,PredictionString\n" + "".join(
        f"{i},{w} 65 62 500 375 {w} 35 0 499 326 \n" for i, w in rows)
    (root / "LOC_val_solution.csv").write_text(text)
    synset_mapping(root / "LOC_synset_mapping.txt")
    return root / "LOC_val_solution.csv"


def flickr30k_cn(root: Path) -> Path:
    """Header-less TSV ``<image>.jpg#zhc#<k><TAB><caption>`` (rows of one image not adjacent)."""
    for name in ("1000092795.jpg", "10002456.jpg"):
        image(root / "flickr30k-images" / name)
    rows = [("1000092795.jpg#zhc#0", "两个年轻人在户外的一个院子里。"),
            ("10002456.jpg#zhc#0", "几个工人站在高处工作。"),
            ("1000092795.jpg#zhc#1", "两个男人站在院子里看着他们的手。")]
    path = root / "flickr30k_cn_test.txt"
    path.write_text("".join(f"{k}\t{c}\n" for k, c in rows), encoding="utf-8")
    return path


def coco_cn(root: Path) -> tuple[Path, Path]:
    """A COCO-CN style table (``image_id,caption`` header, ids without extension) + ``coco-cn_test.txt``."""
    ids = ["COCO_val2014_000000000192", "COCO_val2014_000000000196", "COCO_val2014_000000000208"]
    for image_id in ids:
        image(root / "val2014" / f"{image_id}.jpg")
    table = root / "coco-cn_captions.csv"
    table.write_text("image_id,caption\n" + "".join(f"{i},一张图片的描述 {n}\n" for n, i in enumerate(ids)),
                     encoding="utf-8")
    split = root / "coco-cn_test.txt"
    split.write_text(f"{ids[0]}\n{ids[2]}\n")
    return table, split
