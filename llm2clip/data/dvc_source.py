"""The ``dvc`` source kind: a manifest or webdataset source read from a git + DVC repository at
one revision, through DVC's own Python API (``dvc.api.DVCFileSystem``).

Opening the source (:func:`open_dvc`) resolves the revision (``rev``, else
``common.data_revision``) to a git commit, once; the reader it returns reads at that commit only,
records it (``SourceReader.lineage``: repo, rev, commit, path) and offers the source pinned to it
(``SourceReader.pinned``: ``rev`` = the commit), which is what a worker process or a rerun must
read, so a branch that moves meanwhile changes nothing that was planned. DVC fetches what the
commit's ``.dvc`` / ``dvc.lock`` files name from the repository's DVC cache or its default remote,
with credentials from the environment (for S3: ``AWS_*`` variables or a profile; the endpoint
from the repository's remote config or ``$AWS_ENDPOINT_URL``), never from params.

The inner source reads local copies: a manifest's folder is copied whole into a temporary folder
first; webdataset shards are copied, read and deleted one at a time (local disk holds one shard;
:func:`shard_samples` reads one shard on its own, for a worker). The temporary paths never reach
the output: a sample's ``source_id`` (and a rejection's detail) names
``<repo>@<commit>/<path>/...`` instead.

``dvc`` is imported in this module only, inside functions (the library never imports it at
module level: tests/test_import_graph.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from llm2clip.config import CommonConfig, DvcSource, ManifestSource
from llm2clip.data.records import RawSample
from llm2clip.data.sources import SourceReader, check_caption_mapping, expand_urls, iter_manifest, iter_webdataset
from llm2clip.io import StageError

log = logging.getLogger(__name__)


def open_dvc(src: DvcSource, common: CommonConfig) -> SourceReader:
    """Resolve the source's revision to a commit and return a reader of ``src.path`` at it.

    Nothing is fetched until the samples are iterated.

    Raises:
        StageError: No revision given; the repository, the revision or the path cannot be
            found; or a webdataset inner source's caption mapping does not fit
            ``common.caption_fields`` (a manifest's is checked on its copy, when read).
    """
    rev = src.rev or common.data_revision
    where = _where(src)
    if not rev:
        raise StageError(f"{where}: no revision to read at: set the source's rev, or common.data_revision "
                         "(--data-revision of pipelines.submit / pipelines.local); a work tree is never read")
    if not isinstance(src.inner, ManifestSource):
        check_caption_mapping((src.inner,), common.caption_fields)
    with _repo(src, rev) as (fs, commit):
        if not _isdir(fs, _root(src) or "/"):
            raise StageError(f"{where}: {src.path or '/'} is not a folder of the repository at {rev} (commit "
                             f"{commit}); fix the source's path")
    pinned = replace(src, rev=commit)
    log.info("source %r: %s at %s = commit %s, path %s, read as %s", src.name, src.repo, rev, commit,
             src.path or "/", src.inner.kind)
    read = _manifest_samples if isinstance(src.inner, ManifestSource) else _webdataset_samples
    return SourceReader(src.name, src.kind, read(pinned, common), None, pinned=pinned,
                        lineage={"repo": src.repo, "rev": rev, "commit": commit, "path": src.path})


def shard_names(src: DvcSource) -> list[str]:
    """The shards of a webdataset inner source, relative to ``src.path``, in order."""
    return expand_urls(src.inner.urls)


def shard_samples(src: DvcSource, name: str, common: CommonConfig) -> Iterator[RawSample]:
    """The samples of one shard (a name from :func:`shard_names`) of a pinned webdataset inner
    source (``rev`` a commit: ``SourceReader.pinned``), as the whole source yields them."""
    with _repo(src, src.rev) as (fs, _):
        with tempfile.TemporaryDirectory(prefix="llm2clip-dvc-") as tmp:
            yield from _shard(fs, src, name, tmp, common)


# ------------------------------------------------------------------------------------- reading


def _where(src: DvcSource) -> str:
    return f"source {src.name!r} (kind dvc, repo {src.repo})"


def _root(src: DvcSource) -> str:
    return src.path.strip("/")


def _shown(src: DvcSource) -> str:
    """How a pinned source names its files in what is kept: ``<repo>@<commit>/<path>``."""
    return f"{src.repo}@{src.rev}/{_root(src)}".rstrip("/")


@contextlib.contextmanager
def _repo(src: DvcSource, rev: str) -> Iterator[tuple[Any, str]]:
    """``(DVCFileSystem at rev, the commit rev resolves to)``, closed afterwards.

    Raises:
        StageError: The repository cannot be opened or has no such revision.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    fs = DVCFileSystem(src.repo, rev=rev)
    try:
        try:
            commit = fs.repo.get_rev()
        except (DvcException, OSError) as err:
            raise StageError(f"{_where(src)}: cannot open it at revision {rev!r}: {type(err).__name__}: {err}; fix "
                             "the source's repo or rev (or common.data_revision)") from None
        yield fs, commit
    finally:
        fs.close()


def _isdir(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except OSError:
        return False


def _relabel(sample: RawSample, local: str, shown: str) -> RawSample:
    """Name ``shown`` instead of the temporary copy ``local`` in what is kept."""
    sample.source_id = sample.source_id.replace(local, shown)
    if sample.error is not None:
        sample.error = (sample.error[0], sample.error[1].replace(local, shown))
    return sample


def _fetch_error(src: DvcSource, what: str, err: Exception) -> StageError:
    return StageError(f"{_where(src)}: cannot fetch {what} at commit {src.rev}: {type(err).__name__}: {err}; is "
                      "the data pushed to the repository's DVC remote, and are its credentials in the environment?")


def _manifest_samples(src: DvcSource, common: CommonConfig) -> Iterator[RawSample]:
    """Copy the folder, then read it with the manifest source; the copy goes at the end."""
    from dvc.exceptions import DvcException

    with _repo(src, src.rev) as (fs, _), tempfile.TemporaryDirectory(prefix="llm2clip-dvc-") as tmp:
        local = os.path.join(tmp, "data")
        try:
            fs.get(_root(src) or "/", local, recursive=True)
        except (DvcException, OSError) as err:
            raise _fetch_error(src, src.path or "/", err) from None
        inner = src.inner
        inner = replace(inner, name=src.name, path=os.path.join(local, inner.path),
                        image_root=os.path.join(local, inner.image_root) if inner.image_root else "")
        if not os.path.isfile(inner.path):
            raise StageError(f"{_where(src)}: {src.inner.path} is not a file in {_shown(src)}; fix inner.path (it "
                             "is relative to the source's path)")
        check_caption_mapping((inner,), common.caption_fields)
        for sample in iter_manifest(inner, common.s3_endpoint_url):
            yield _relabel(sample, local, _shown(src))


def _webdataset_samples(src: DvcSource, common: CommonConfig) -> Iterator[RawSample]:
    """Each shard in turn (one repository opened for all)."""
    with _repo(src, src.rev) as (fs, _), tempfile.TemporaryDirectory(prefix="llm2clip-dvc-") as tmp:
        for name in shard_names(src):
            yield from _shard(fs, src, name, tmp, common)


def _shard(fs: Any, src: DvcSource, name: str, tmp: str, common: CommonConfig) -> Iterator[RawSample]:
    """Copy one shard into ``tmp``, read it with the webdataset source, delete it."""
    from dvc.exceptions import DvcException

    local = os.path.join(tmp, "shard.tar")
    try:
        fs.get_file(posixpath.join(_root(src), name) if _root(src) else name, local)
    except FileNotFoundError:
        raise StageError(f"{_where(src)}: shard {name} is not in {_shown(src)}; fix inner.urls (relative to the "
                         "source's path)") from None
    except (DvcException, OSError) as err:
        raise _fetch_error(src, f"shard {name}", err) from None
    try:
        for sample in iter_webdataset(replace(src.inner, name=src.name, urls=local), common.s3_endpoint_url):
            yield _relabel(sample, local, f"{_shown(src)}/{name}")
    finally:
        Path(local).unlink(missing_ok=True)


# ----------------------------------------------------------------------- a prepared dataset


def fetch_prepared(repo: str, path: str, rev: str, out: Path) -> dict[str, str]:
    """Copy the prepare_data output that ``repo`` tracks at ``path`` (``dvc add`` or a ``dvc.yaml``
    out) at revision ``rev`` into the empty local folder ``out``, and check it is one: its
    manifest is a prepare_data manifest and every shard's sha256 is the manifest's.

    Returns:
        The lineage: ``{repo, rev, commit, path}``.

    Raises:
        StageError: no revision, a repository/revision/path that cannot be read, data not pushed,
            or a folder that is not a complete, intact prepare_data output.
    """
    from dvc.exceptions import DvcException

    from llm2clip.data.shards import load_manifest, verify_shards

    where = f"prepared data {repo}:{path}"
    if not rev:
        raise StageError(f"{where}: no revision to read at: set common.data_revision (--data-revision); a work "
                         "tree is never read")
    src = DvcSource(name="prepared", repo=repo, path=path, inner=ManifestSource(name="prepared", path="-"))
    with _repo(src, rev) as (fs, commit):
        if not _isdir(fs, _root(src) or "/"):
            raise StageError(f"{where}: {path} is not a folder of the repository at {rev} (commit {commit})")
        try:
            fs.get(_root(src) or "/", str(out), recursive=True)
        except (DvcException, OSError) as err:
            raise _fetch_error(replace(src, rev=commit), path, err) from None
    try:
        verify_shards(str(out), load_manifest(str(out)))
    except StageError as err:
        raise StageError(f"{where} at {rev} (commit {commit}) is not a usable prepare_data output: {err}") from None
    log.info("prepared data: %s at %s = commit %s, path %s", repo, rev, commit, path)
    return {"repo": repo, "rev": rev, "commit": commit, "path": path}
