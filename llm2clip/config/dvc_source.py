"""The ``dvc`` source kind: a manifest or webdataset source DVC-tracked in a git repository.

Imported by :mod:`llm2clip.config.prepare_data` after the two kinds it wraps (the ``Source``
union then names it); import it from ``llm2clip.config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from llm2clip.config.base import ConfigError
from llm2clip.config.prepare_data import ManifestSource, WebDatasetSource


@dataclass(frozen=True)
class DvcSource:
    """Samples of a folder that is DVC-tracked (or inside a DVC-tracked folder) in a git
    repository, at one git revision, read through DVC's own Python API
    (``dvc.api.DVCFileSystem``) by :mod:`llm2clip.data.dvc_source`.

    The data comes from the DVC cache or remote the repository's ``.dvc/config`` names at that
    revision; credentials come from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE`` /
    ``$AWS_ENDPOINT_URL`` for an S3 remote, ...), never from params. The git commit ``rev``
    resolved to is what was read: the reader records it (``SourceReader.lineage``), so a rerun
    against a branch that moved is visible.

    Example::

        - kind: dvc
          name: photos
          repo: https://github.com/example/data-registry.git   # or a local path
          rev: v1.2            # empty: common.data_revision
          path: datasets/photos
          inner: {kind: manifest, path: captions.csv, caption_columns: {short: caption, dense: long}}

    Attributes:
        repo: The git repository: a URL (https, ssh) or a local path.
        rev: Git revision (commit, tag, branch) to read at. Empty: ``common.data_revision``
            (``--data-revision`` of ``pipelines.submit`` / ``pipelines.local``); one of the two
            must be set: a local repository is never read from its work tree.
        path: Folder inside the repository, relative to its root (``datasets/photos``); empty: the
            root. The inner source's paths are relative to it.
        inner: The source that reads the folder: ``kind: manifest`` (``path``: the CSV/JSONL,
            ``image_root`` optional, both relative to ``path``; the folder is copied to a temporary
            folder first) or ``kind: webdataset`` (``urls``: shard names or a brace pattern
            relative to ``path``; each shard is copied, read and deleted in turn, so local disk
            holds one shard at a time). Its ``name`` is ignored: samples carry this source's name.
    """

    kind: Literal["dvc"] = "dvc"
    name: str = "dvc"
    repo: str = ""
    rev: str = ""
    path: str = ""
    inner: ManifestSource | WebDatasetSource = field(default_factory=lambda: ManifestSource(path="manifest.csv"))

    def __post_init__(self) -> None:
        where = f"dvc source {self.name!r}"
        if not self.repo.strip():
            raise ConfigError(f"{where}: repo is empty; set it to the git repository (URL or local path) "
                              "that tracks the data")
        _check_relative(f"{where}: path", self.path, allow_empty=True)
        if isinstance(self.inner, ManifestSource):
            _check_relative(f"{where}: inner.path", self.inner.path)
            _check_relative(f"{where}: inner.image_root", self.inner.image_root, allow_empty=True)
        elif not self.inner.urls.strip():
            raise ConfigError(f"{where}: inner.urls is empty; name the shards relative to path "
                              "(e.g. shard-{000..009}.tar)")
        else:
            _check_relative(f"{where}: inner.urls", self.inner.urls)


_OUTSIDE = re.compile(r"://|(^|[,{])\s*[/\\]|(^|[/,{])\.\.([/,}]|$)")
"""A URL, an absolute path (also as one alternative of a brace pattern or list), or a ``..`` step."""


def _check_relative(where: str, value: str, allow_empty: bool = False) -> None:
    """A path (or webdataset URL pattern) inside the repository: relative, no ``..``, no URL."""
    if not value.strip():
        if allow_empty:
            return
        raise ConfigError(f"{where} is empty; set it to a file relative to the source's path")
    if _OUTSIDE.search(value.strip()):
        raise ConfigError(f"{where} {value!r} must be a path inside the repository, relative to the source's "
                          "path (no absolute path, URL or '..')")
