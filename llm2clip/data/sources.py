"""Sample sources: img2dataset-style webdataset shards, CSV/JSONL manifests, demo generators.

Every source yields :class:`~llm2clip.data.records.RawSample` objects, never raises on a bad
row or file (it yields a sample with ``error`` set instead), and reads local paths and
``s3://`` URLs alike (S3 through fsspec with ``common.s3_endpoint_url``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llm2clip.config import (
    CommonConfig,
    EmojiSource,
    ManifestSource,
    Source,
    SyntheticSource,
    WebDatasetSource,
)
from llm2clip.data import records as R
from llm2clip.data.records import RawSample, make_key
from llm2clip.io import StageError, is_remote, s3_filesystem

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class SourceReader:
    """A source ready to iterate: its samples, the expected count (for progress) or None.

    ``skipped`` says why a source yields nothing at all on this machine (e.g. no emoji font).
    """

    name: str
    kind: str
    samples: Iterator[RawSample]
    total: int | None
    skipped: str | None = None


def check_caption_mapping(sources: tuple[Source, ...], caption_fields: tuple[str, ...]) -> None:
    """Every mapped source must map exactly ``common.caption_fields``; fail early if not.

    Raises:
        StageError: naming the source, the missing / unknown names and what to set.
    """
    for i, src in enumerate(sources):
        mapping = getattr(src, "caption_fields", None) or getattr(src, "caption_columns", None)
        if mapping is None:
            continue
        attr = "caption_fields" if isinstance(src, WebDatasetSource) else "caption_columns"
        missing = [n for n in caption_fields if n not in mapping]
        unknown = [n for n in mapping if n not in caption_fields]
        if missing or unknown:
            raise StageError(
                f"prepare_data.sources[{i}] ({src.name}).{attr} maps {sorted(mapping)}, but "
                f"common.caption_fields is {list(caption_fields)} (missing: {missing}, unknown: "
                f"{unknown}); map every caption field, e.g. --set prepare_data.sources.{i}.{attr}."
                f"{(missing or unknown)[0]}=..."
            )
        if isinstance(src, WebDatasetSource):
            bad = [s for s in mapping.values() if s.startswith("json:") and len(s) == 5]
            if bad or not src.urls:
                raise StageError(f"prepare_data.sources[{i}] ({src.name}): set urls and use 'json:<key>'")
        elif not src.path:
            raise StageError(f"prepare_data.sources[{i}] ({src.name}): path is empty")


def open_source(src: Source, common: CommonConfig) -> SourceReader:
    """The reader of one configured source."""
    from llm2clip.data.emoji_source import font_problem, iter_emoji
    from llm2clip.data.synthetic import iter_synthetic

    fields = common.caption_fields
    if isinstance(src, SyntheticSource):
        return SourceReader(src.name, src.kind, iter_synthetic(src, common.seed, fields), src.count)
    if isinstance(src, EmojiSource):
        if problem := font_problem(src.font_path):
            log.warning("source %r skipped: %s", src.name, problem)
            return SourceReader(src.name, src.kind, iter(()), 0, skipped=problem)
        return SourceReader(src.name, src.kind, iter_emoji(src, common.seed, fields), src.count or None)
    if isinstance(src, WebDatasetSource):
        return SourceReader(src.name, src.kind, iter_webdataset(src, common.s3_endpoint_url), None)
    return SourceReader(src.name, src.kind, iter_manifest(src, common.s3_endpoint_url), None)


# ----------------------------------------------------------------------------- file access


def _open(path: str, endpoint_url: str):
    if is_remote(path):
        return s3_filesystem(endpoint_url).open(path, "rb")
    return open(path, "rb")


def _read_bytes(path: str, endpoint_url: str) -> bytes:
    with _open(path, endpoint_url) as f:
        return f.read()


def expand_urls(urls: str) -> list[str]:
    """``a-{000..002}.tar,b.tar`` -> the list of shard paths (brace patterns expanded)."""
    import braceexpand

    out: list[str] = []
    for part in (u.strip() for u in urls.split(",")):
        if part:
            out.extend(braceexpand.braceexpand(part))
    return out


# ------------------------------------------------------------------------------ webdataset


def _tar_groups(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a tar stream (webdataset key rules)."""
    key, files = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = posixpath.split(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            member_key = f"{dirname}/{stem}" if dirname else stem
            if member_key != key and key is not None:
                yield key, files
                files = {}
            key = member_key
            files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def _wds_caption(files: dict[str, bytes], spec: str, meta: Any) -> Any:
    if spec.startswith("json:"):
        return meta.get(spec[5:]) if isinstance(meta, dict) else None
    data = files.get(spec.lower())
    return data.decode("utf-8", errors="replace") if data is not None else None


def _wds_sample(src: WebDatasetSource, url: str, key: str, files: dict[str, bytes]) -> RawSample:
    sample = RawSample(source=src.name, source_id=f"{url}#{key}", key=make_key(src.name, key))
    meta: Any = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as err:
            sample.error = (R.BAD_METADATA, f"{key}.json is not valid JSON: {err}")
            return sample
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        sample.error = (R.MISSING_IMAGE, f"no {'/'.join(IMAGE_EXTENSIONS)} member (has {sorted(files)})")
        return sample
    sample.image = files[ext]
    sample.captions = {name: _wds_caption(files, spec, meta) for name, spec in src.caption_fields.items()}
    if src.label_field:
        label = _wds_caption(files, src.label_field, meta)
        sample.label = None if label is None else str(label)
    return sample


def iter_webdataset(src: WebDatasetSource, endpoint_url: str = "") -> Iterator[RawSample]:
    """Samples of img2dataset-style shards; an unreadable shard becomes one quarantine record."""
    for url in expand_urls(src.urls):
        n = 0
        try:
            with _open(url, endpoint_url) as f:
                for key, files in _tar_groups(f):
                    n += 1
                    yield _wds_sample(src, url, key, files)
        except (OSError, tarfile.TarError, EOFError) as err:
            log.warning("source %r: shard %s unreadable after %d samples: %s", src.name, url, n, err)
            yield RawSample(
                source=src.name, source_id=url, key=make_key(src.name, f"shard-{url}"),
                error=(R.UNREADABLE_SHARD, f"{type(err).__name__}: {err} (after {n} samples)"),
            )


# -------------------------------------------------------------------------------- manifest


def _manifest_rows(src: ManifestSource, endpoint_url: str) -> Iterator[tuple[int, dict | None, str]]:
    """``(line_no, row or None, error)`` of a CSV or JSONL manifest."""
    text = _read_bytes(src.path, endpoint_url).decode("utf-8-sig", errors="replace")
    if src.path.lower().endswith((".jsonl", ".ndjson", ".json")):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                yield n, None, f"line {n} is not valid JSON: {err}"
                continue
            yield (n, row, "") if isinstance(row, dict) else (n, None, f"line {n} is not an object")
        return
    reader = csv.DictReader(io.StringIO(text))
    needed = [src.image_column, *src.caption_columns.values(), *filter(None, [src.key_column])]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise StageError(
            f"{src.path}: column(s) {missing} not found (columns: {reader.fieldnames}); "
            f"fix the manifest or the source's image_column/caption_columns/key_column"
        )
    for n, row in enumerate(reader, start=2):
        yield n, row, ""


def _image_path(src: ManifestSource, value: str) -> str:
    """Where the image of a manifest row is: absolute / URL as is, else under image_root."""
    if is_remote(value) or os.path.isabs(value):
        return value
    if src.image_root:
        root = src.image_root
    elif is_remote(src.path):
        root = posixpath.dirname(src.path)
    else:
        root = os.path.dirname(os.path.abspath(src.path))
    return f"{root.rstrip('/')}/{value}" if is_remote(root) else os.path.join(root, value)


def iter_manifest(src: ManifestSource, endpoint_url: str = "") -> Iterator[RawSample]:
    """Samples of a CSV/JSONL manifest plus an image folder (local or ``s3://``)."""
    for n, row, error in _manifest_rows(src, endpoint_url):
        where = f"{src.path}:{n}"
        if row is None:
            yield RawSample(src.name, where, make_key(src.name, f"line-{n}"), error=(R.BAD_METADATA, error))
            continue
        image = row.get(src.image_column)
        raw_id = str(row.get(src.key_column) or "") if src.key_column else ""
        if not raw_id and isinstance(image, str):
            raw_id = os.path.splitext(image)[0]
        key = make_key(src.name, raw_id or f"line-{n}")
        sample = RawSample(src.name, str(image) if image else where, key)
        sample.captions = {name: row.get(column) for name, column in src.caption_columns.items()}
        if src.label_column and row.get(src.label_column) not in (None, ""):
            sample.label = str(row[src.label_column])
        if not isinstance(image, str) or not image:
            sample.error = (R.MISSING_IMAGE, f"{where}: no value in column {src.image_column!r}")
        else:
            try:
                sample.image = _read_bytes(_image_path(src, image), endpoint_url)
            except (OSError, ValueError) as err:
                sample.error = (R.MISSING_IMAGE, f"cannot read {image}: {type(err).__name__}: {err}")
        yield sample
