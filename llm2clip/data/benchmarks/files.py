"""File access shared by the benchmark readers: local paths and ``s3://`` alike.

A file or folder the layout needs that is not there is a one-line :class:`StageError` naming it
and the expected layout; an image that is not there is a sample with ``missing_image``.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from llm2clip.data import records as R
from llm2clip.data.records import RawSample, make_key
from llm2clip.data.sources import IMAGE_EXTENSIONS, MAX_FILE_BYTES, NotAFileError, _read_bytes
from llm2clip.io import StageError, is_remote, s3_filesystem


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or an ``s3://`` prefix."""
    parts = tuple(p for p in parts if p)
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def parent(path: str) -> str:
    """The folder holding ``path`` (absolute for a local path)."""
    if is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def stem(name: str) -> str:
    """``a/b/sa_1.jpg`` -> ``sa_1`` (only a known image extension is removed)."""
    base = posixpath.basename(name.replace("\\", "/"))
    head, ext = os.path.splitext(base)
    return head if ext[1:].lower() in IMAGE_EXTENSIONS else base


def read_file(path: str, endpoint_url: str, source: str, layout: str) -> bytes:
    """The bytes of a file the layout needs.

    Raises:
        StageError: it is missing or unreadable (naming the file and the expected layout).
    """
    if not path:
        raise StageError(f"source {source!r}: path is empty; expected {layout}")
    try:
        return _read_bytes(path, endpoint_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, NotAFileError):
        raise StageError(f"source {source!r}: {path} not found or not a file; expected {layout}") from None
    except (OSError, ValueError) as err:
        raise StageError(f"source {source!r}: cannot read {path}: {type(err).__name__}: {err}") from None


def read_text(path: str, endpoint_url: str, source: str, layout: str) -> str:
    """A UTF-8 text file the layout needs (a byte-order mark is dropped).

    Raises:
        StageError: missing, unreadable or not UTF-8.
    """
    data = read_file(path, endpoint_url, source, layout)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise StageError(f"source {source!r}: {path} is not UTF-8 ({err}); expected {layout}") from None


def read_json(path: str, endpoint_url: str, source: str, layout: str) -> Any:
    """A JSON file the layout needs.

    Raises:
        StageError: missing, unreadable or not JSON.
    """
    text = read_text(path, endpoint_url, source, layout)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise StageError(f"source {source!r}: {path} is not valid JSON ({err}); expected {layout}") from None


def field_of(entry: Any, key: str, where: str, layout: str) -> Any:
    """``entry[key]`` of a JSON object the layout defines.

    Raises:
        StageError: ``entry`` is not an object or has no ``key`` (naming ``where`` and the key).
    """
    if not isinstance(entry, dict):
        raise StageError(f"{where} is not a JSON object; expected {layout}")
    if key not in entry:
        raise StageError(f"{where} has no {key!r} key (keys: {sorted(entry)[:20]}); expected {layout}")
    return entry[key]


def list_field(entry: Any, key: str, where: str, layout: str) -> list:
    """``entry[key]``, which the layout says is a list.

    Raises:
        StageError: as :func:`field_of`, or the value is not a list.
    """
    value = field_of(entry, key, where, layout)
    if not isinstance(value, list):
        raise StageError(f"{where}: {key!r} is a {type(value).__name__}, not a list; expected {layout}")
    return value


def list_folder(folder: str, endpoint_url: str, source: str, layout: str) -> list[tuple[str, bool]]:
    """``(name, is_folder)`` of every entry of a folder the layout needs, sorted by name.

    Raises:
        StageError: the folder does not exist.
    """
    if is_remote(folder):
        fs, base = s3_filesystem(endpoint_url), folder.rstrip("/")
        if not fs.isdir(base):
            raise StageError(f"source {source!r}: folder {folder} not found; expected {layout}")
        return sorted((posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory")
                      for e in fs.ls(base, detail=True))
    if not os.path.isdir(folder):
        raise StageError(f"source {source!r}: folder {folder} not found; expected {layout}")
    with os.scandir(folder) as entries:
        return sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith("."))


def is_image(name: str) -> bool:
    """A file name with an image extension (any case: ImageNet's ``.JPEG``)."""
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS


def image_sample(source: str, raw_id: str, path: str, endpoint_url: str, *, captions: dict[str, list[str]],
                 label: str | None = None, where: str = "") -> RawSample:
    """A sample with the image at ``path`` read (``missing_image`` when it cannot be)."""
    sample = RawSample(source=source, source_id=path, key=make_key(source, raw_id), captions=captions, label=label)
    try:
        sample.image = _read_bytes(path, endpoint_url, MAX_FILE_BYTES)
    except (OSError, ValueError) as err:
        prefix = f"{where}: " if where else ""
        sample.error = (R.MISSING_IMAGE, f"{prefix}cannot read {path}: {type(err).__name__}: {err}")
    return sample
