"""Webdataset shards of a prepared split: a deterministic atomic writer and readers.

Output layout of prepare_data (what later stages read through the helpers below)::

    <dir>/train-000000.tar ...   samples: <key>.jpg (RGB JPEG) + <key>.json (see SampleRecord.meta)
    <dir>/val-000000.tar ...
    <dir>/test-000000.tar ...    an evaluation set (prepare_data.eval_set): its only split
    <dir>/quarantine.jsonl       one rejected sample per line: key, source, source_id, reason, detail
    <dir>/validation/            great-expectations result JSON, Data Docs HTML, preview.jpg
    <dir>/manifest.json          written last: counts, shards (name, count, sha256), caption fields

Shards are byte-identical for the same config: tar headers have fixed mtime/uid/gid/mode and
members are written in a fixed order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llm2clip.config import EVAL_SPLIT  # "test": the one split of an evaluation set (prepare_data.eval_set)
from llm2clip.contracts import contract, read_manifest
from llm2clip.io import StageError, atomic_path, is_remote, s3_filesystem, sha256_file

STAGE = "prepare_data"
FORMAT_VERSION = contract(STAGE).format_version
TRAIN_SPLITS = ("train", "val")  # what a training-data run writes (val by prepare_data.val_fraction)
SPLITS = (*TRAIN_SPLITS, EVAL_SPLIT)  # every split name prepare_data writes


def run_splits(eval_set: str) -> tuple[str, ...]:
    """The splits one prepare_data run writes: ``("test",)`` for an evaluation set, else train/val."""
    return (EVAL_SPLIT,) if eval_set else TRAIN_SPLITS


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


class ShardWriter:
    """Writes one tar shard atomically (temp file + rename) with reproducible headers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._tar = self._stack.enter_context(tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT))
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded  # where the data starts: after the header(s), before the padding

    def write(self, key: str, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample: ``members`` maps extension (``jpg``, ``json``) -> bytes.

        Returns:
            ``{extension: (offset, length)}``: where each member's bytes are in the tar file (so a
            reader can fetch one sample by a byte range, as prepare_data's pass 2 does).
        """
        where = {ext: (self._add(f"{key}.{ext}", members[ext]), len(members[ext])) for ext in sorted(members)}
        self.count += 1
        return where


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a sample's ``json`` member."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def shard_entry(path: Path, count: int) -> dict[str, Any]:
    """The manifest's description of one written shard."""
    return {"name": path.name, "count": count, "sha256": sha256_file(path)}


def _is_ours(name: str) -> bool:
    """Files an earlier prepare_data run may have left: manifest, shards, temp files."""
    shard = name.endswith(".tar") and name.split("-")[0] in SPLITS
    return name == "manifest.json" or shard or (name.startswith(".") and ".tmp-" in name)


def invalidate(target: str, endpoint_url: str = "") -> list[str]:
    """Remove what an earlier run left in ``target`` (manifest first), before writing anew.

    Only prepare_data's own files are touched (``manifest.json``, ``{train,val,test}-*.tar``,
    temp files); a directory without ``manifest.json`` reads as unfinished to every later stage.

    Returns:
        The names removed.
    """
    if is_remote(target):
        fs = s3_filesystem(endpoint_url)
        base = target.rstrip("/")
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)] if fs.exists(base) else []
        names = sorted((n for n in names if _is_ours(n)), key=lambda n: n != "manifest.json")
        for name in names:
            fs.rm(f"{base}/{name}")
        return names
    directory = Path(target)
    if not directory.is_dir():
        return []
    names = sorted((p.name for p in directory.iterdir() if p.is_file() and _is_ours(p.name)),
                   key=lambda n: n != "manifest.json")
    for name in names:
        (directory / name).unlink()
    return names


# -------------------------------------------------------------------------------- readers


@dataclass
class PreparedSample:
    """One sample read back: ``image`` is a PIL RGB image, or the jpg bytes with ``decode=False``."""

    key: str
    image: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def captions(self) -> dict[str, list[str]]:
        return self.meta["captions"]

    @property
    def label(self) -> str | None:
        return self.meta.get("label")


def load_manifest(
    directory: str, endpoint_url: str = "", caption_fields: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Read and check a prepare_data manifest (its contract, then the caption fields needed).

    Raises:
        StageError: no manifest (the stage has not finished), another stage's output, another
            format (:func:`llm2clip.contracts.read_manifest`), or a caption field the caller
            needs is missing.
    """
    manifest = read_manifest(STAGE, directory, endpoint_url)
    missing = [f for f in caption_fields or () if f not in manifest["caption_fields"]]
    if missing:
        raise StageError(
            f"{directory} has caption fields {manifest['caption_fields']}, {missing} missing; "
            "rerun prepare_data with the same common.caption_fields"
        )
    return manifest


def shard_paths(directory: str, split: str, manifest: dict[str, Any]) -> list[str]:
    """Paths or URLs of a split's shards, in order (empty list for an empty split)."""
    base = str(directory).rstrip("/")
    return [f"{base}/{s['name']}" for s in manifest["shards"].get(split, [])]


def verify_shards(directory: str, manifest: dict[str, Any], endpoint_url: str = "") -> None:
    """Recompute every shard's sha256 and compare it with the manifest.

    Raises:
        StageError: naming the first shard that is missing or differs.
    """
    fs = s3_filesystem(endpoint_url) if is_remote(directory) else None
    for split in manifest["shards"]:
        paths = shard_paths(directory, split, manifest)
        for entry, path in zip(manifest["shards"][split], paths, strict=True):
            if fs is not None:
                digest = hashlib.sha256(fs.cat(path)).hexdigest() if fs.exists(path) else None
            else:
                digest = sha256_file(path) if Path(path).is_file() else None
            if digest != entry["sha256"]:
                raise StageError(
                    f"{path}: {'missing' if digest is None else 'sha256 differs from manifest.json'}; "
                    "the data directory was changed after prepare_data, rerun it"
                )


def iter_groups(stream: IO[bytes], wanted: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The one reader of the tars this project writes (prepared shards, embedding sidecars):
    consecutive members grouped by webdataset key (file name up to the first dot).

    Why not ``webdataset``'s own reader (which training does use, for shuffling): this one reads
    one sequential pass over any byte stream (a file, an fsspec S3 stream, or a
    :class:`~llm2clip.data.sidecars.HashingReader` that checks the shard's sha256 in the same
    pass), skips the members it does not want without keeping them (``wanted=set()``: keys only,
    for alignment checks), keeps extensions as written (``short.npy``), and lets the caller walk
    an image shard and its sidecar in lockstep, key by key
    (:func:`~llm2clip.data.sidecars.iter_shard_pair`). Untrusted input tars (a ``webdataset``
    source of prepare_data) go through the hardened reader in :mod:`llm2clip.data.sources` instead.

    Args:
        stream: A tar byte stream, read sequentially.
        wanted: Extensions whose bytes are kept (None: all); the others are skipped unread.

    Yields:
        ``(key, {extension: bytes})`` in file order.
    """
    key, parts = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[ext] = tar.extractfile(member).read() if wanted is None or ext in wanted else b""
    if key is not None:
        yield key, parts


def iter_samples(
    directory: str, split: str, *, endpoint_url: str = "", manifest: dict[str, Any] | None = None,
    decode: bool = True,
) -> Iterator[PreparedSample]:
    """Iterate the samples of one split in shard order (local or ``s3://``)."""
    from PIL import Image

    manifest = manifest or load_manifest(directory, endpoint_url)
    fs = s3_filesystem(endpoint_url) if is_remote(directory) else None
    for path in shard_paths(directory, split, manifest):
        with fs.open(path, "rb") if fs else open(path, "rb") as f:
            for key, parts in iter_groups(f, {"jpg", "json"}):
                image = Image.open(io.BytesIO(parts["jpg"])).convert("RGB") if decode else parts["jpg"]
                yield PreparedSample(key, image, json.loads(parts["json"]))


def enable_s3_for_webdataset(endpoint_url: str = "") -> None:
    """Let ``webdataset.WebDataset`` open ``s3://`` URLs through fsspec (with this endpoint)."""
    import webdataset  # noqa: F401  (registers webdataset.gopen in sys.modules)

    def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
        return s3_filesystem(endpoint_url).open(url, mode)

    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3
