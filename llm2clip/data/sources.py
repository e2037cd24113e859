"""Sample sources: img2dataset-style webdataset shards, CSV/JSONL manifests, demo generators.

Every source yields :class:`~llm2clip.data.records.RawSample` objects, never raises on a bad
row or file (it yields a sample with ``error`` set instead), and reads local paths and
``s3://`` URLs alike (S3 through fsspec with ``common.s3_endpoint_url``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llm2clip.config import (
    CaptionTableSource,
    CommonConfig,
    DvcSource,
    EmojiSource,
    ImageNetSource,
    KarpathySource,
    LongCaptionSource,
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
    ``lineage`` says what was read when the config alone does not (a ``dvc`` source: repo, rev and
    the git commit it resolved to), for the prepare_data manifest; ``pinned`` is then the source
    that reads exactly that (the commit as its rev), for a worker or a rerun to read.
    """

    name: str
    kind: str
    samples: Iterator[RawSample]
    total: int | None
    skipped: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    pinned: Source | None = None


def check_caption_mapping(sources: tuple[Source, ...], caption_fields: tuple[str, ...]) -> None:
    """Fail early (before any output is touched) on a source that cannot work.

    Every mapped source must map exactly ``common.caption_fields`` and keep the first of them
    required; webdataset URLs must expand (balanced braces); a local manifest must exist.

    Raises:
        StageError: naming the source, what is wrong and what to set.
    """
    for i, src in enumerate(sources):
        if isinstance(src, BENCHMARK_SOURCES):
            _check_benchmark(i, src, caption_fields)
            continue
        if isinstance(src, SyntheticSource):
            from llm2clip.data.synthetic import caption_plan

            caption_plan(src, caption_fields)  # a wrong captions mapping fails before any output is touched
            continue
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
        if caption_fields and caption_fields[0] in src.optional_captions:  # the preview and CRA start from it
            raise StageError(
                f"prepare_data.sources[{i}] ({src.name}).optional_captions: {caption_fields[0]!r} is the "
                "first of common.caption_fields, which every sample must have; make another field "
                "optional or put a required field first in common.caption_fields"
            )
        if isinstance(src, WebDatasetSource):
            bad = [s for s in mapping.values() if s.startswith("json:") and len(s) == 5]
            if bad or not src.urls:
                raise StageError(f"prepare_data.sources[{i}] ({src.name}): set urls and use 'json:<key>'")
            expand_urls(src.urls)
        elif not src.path:
            raise StageError(f"prepare_data.sources[{i}] ({src.name}): path is empty")
        elif not is_remote(src.path) and not os.path.isfile(src.path):
            raise StageError(_no_manifest(src, i))


BENCHMARK_SOURCES = (KarpathySource, LongCaptionSource, ImageNetSource, CaptionTableSource)


def _check_benchmark(i: int, src: Any, caption_fields: tuple[str, ...]) -> None:
    """A benchmark source gives exactly its ``caption_field`` (ImageNet: none), and its files exist.

    Raises:
        StageError: naming the source, the caption fields, or the missing file or folder.
    """
    where = f"sources[{i}] ({src.name}, kind {src.kind})"
    gives = [] if isinstance(src, ImageNetSource) else [src.caption_field]
    if list(caption_fields) != gives:
        what = f"one caption field, {gives[0]!r} (its caption_field)" if gives else "labels only, no caption field"
        fix = f"use caption_fields {gives} for this set"
        if gives and len(caption_fields) == 1:
            fix += f", or set the source's caption_field to {caption_fields[0]!r}"
        raise StageError(f"{where} gives {what}, but common.caption_fields is {list(caption_fields)} and every "
                         f"sample needs every field: {fix}")
    folder = getattr(src, "layout", "") in ("urban1k", "folders")
    needed = [("path", src.path, folder)] + [
        (attr, getattr(src, attr), False) for attr in ("synset_mapping", "classnames_file", "ids_file")
        if getattr(src, attr, "")]
    for attr, path, is_folder in needed:
        if not path:
            raise StageError(f"{where}: {attr} is empty; set it to the set's "
                             f"{'folder' if is_folder else 'file'} (see llm2clip.config.{type(src).__name__})")
        if not is_remote(path) and not (os.path.isdir(path) if is_folder else os.path.isfile(path)):
            raise StageError(f"{where}: {attr} {path} does not exist or is not a {'folder' if is_folder else 'file'}"
                             f"; fix the source's {attr} (layout: see llm2clip.config.{type(src).__name__})")


def _open_synthetic(src: SyntheticSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.synthetic import iter_synthetic

    return SourceReader(src.name, src.kind, iter_synthetic(src, common.seed, common.caption_fields), src.count)


def _open_emoji(src: EmojiSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.emoji_source import font_problem, iter_emoji

    if problem := font_problem(src.font_path):
        log.warning("source %r skipped: %s", src.name, problem)
        return SourceReader(src.name, src.kind, iter(()), 0, skipped=problem)
    return SourceReader(src.name, src.kind, iter_emoji(src, common.seed, common.caption_fields),
                        src.count or None)


def _open_webdataset(src: WebDatasetSource, common: CommonConfig) -> SourceReader:
    return SourceReader(src.name, src.kind, iter_webdataset(src, common.s3_endpoint_url), None)


def _open_manifest(src: ManifestSource, common: CommonConfig) -> SourceReader:
    return SourceReader(src.name, src.kind, iter_manifest(src, common.s3_endpoint_url), None)


def _open_karpathy(src: KarpathySource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.benchmarks.karpathy import open_karpathy

    return SourceReader(src.name, src.kind, *open_karpathy(src, common.s3_endpoint_url))


def _open_long_caption(src: LongCaptionSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.benchmarks.long_caption import open_long_caption

    return SourceReader(src.name, src.kind, *open_long_caption(src, common.s3_endpoint_url))


def _open_imagenet(src: ImageNetSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.benchmarks.imagenet import open_imagenet

    return SourceReader(src.name, src.kind, *open_imagenet(src, common.s3_endpoint_url))


def _open_caption_table(src: CaptionTableSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.benchmarks.caption_table import open_caption_table

    return SourceReader(src.name, src.kind, *open_caption_table(src, common.s3_endpoint_url))


def _open_dvc(src: DvcSource, common: CommonConfig) -> SourceReader:
    from llm2clip.data.dvc_source import open_dvc  # imports dvc, lazily

    return open_dvc(src, common)


# Source kind (the ``kind`` of a ``prepare_data.sources`` entry, see ``llm2clip.config.Source``)
# -> its reader. A new kind: its config dataclass in the ``Source`` union, a reader here. The
# benchmark kinds (public evaluation sets in their own layouts) live in llm2clip.data.benchmarks.
SOURCE_READERS: dict[str, Callable[[Any, CommonConfig], SourceReader]] = {
    "synthetic": _open_synthetic,
    "emoji": _open_emoji,
    "webdataset": _open_webdataset,
    "manifest": _open_manifest,
    "karpathy": _open_karpathy,
    "long_caption": _open_long_caption,
    "imagenet": _open_imagenet,
    "caption_table": _open_caption_table,
    "dvc": _open_dvc,
}


def open_source(src: Source, common: CommonConfig) -> SourceReader:
    """The reader of one configured source.

    Raises:
        StageError: A source kind with no reader in :data:`SOURCE_READERS` (names the known ones).
    """
    reader = SOURCE_READERS.get(src.kind)
    if reader is None:
        raise StageError(f"source {src.name!r} has kind {src.kind!r}, which has no reader; "
                         f"known kinds: {sorted(SOURCE_READERS)}")
    return reader(src, common)


# ----------------------------------------------------------------------------- file access


MAX_FILE_BYTES = 1 << 30  # a local image or tar member larger than this is refused, not read into memory


class NotAFileError(OSError):
    """A local path that is not a regular file (FIFO, device, folder) or is larger than the limit."""


def _open(path: str, endpoint_url: str):
    if is_remote(path):
        return s3_filesystem(endpoint_url).open(path, "rb")
    return open(path, "rb")


def _read_local(path: str, limit: int | None) -> bytes:
    """The bytes of a regular local file; a FIFO never blocks, ``/dev/zero`` is never read.

    Raises:
        NotAFileError: not a regular file, or larger than ``limit`` bytes.
        OSError: as ``open`` (missing, permission, loop, name too long).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO returns at once
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFileError(f"{path} is not a regular file (a folder, FIFO or device): not read")
        if limit is not None and info.st_size > limit:
            raise NotAFileError(f"{path} has {info.st_size} bytes, more than {limit}: not read")
        return f.read()


def _read_bytes(path: str, endpoint_url: str, limit: int | None = None) -> bytes:
    if not is_remote(path):
        return _read_local(path, limit)
    with _open(path, endpoint_url) as f:
        return f.read()


def split_urls(urls: str) -> list[str]:
    """Split a comma-separated URL list at the commas OUTSIDE braces (``{a,b}`` stays whole).

    Raises:
        StageError: the braces do not balance (naming the URL list).
    """
    parts, depth, start, escaped = [], 0, 0, False
    for i, ch in enumerate(urls):
        if escaped or ch == "\\":
            escaped = not escaped
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(urls[start:i])
            start = i + 1
        if depth < 0:
            break
    if depth != 0:
        raise StageError(_unbalanced(urls))
    parts.append(urls[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_urls(urls: str) -> list[str]:
    """``a-{000..002}.tar,s3://b/{x,y}.tar`` -> the list of shard paths, in order.

    Commas outside braces separate URLs; inside braces they are alternatives; ``{00..09}`` is a
    zero-padded range; patterns combine (``{a,b}-{0..1}`` -> 4 URLs).

    Raises:
        StageError: unbalanced braces (naming the URL list), or nothing to read.
    """
    import braceexpand

    out: list[str] = []
    for part in split_urls(urls):
        try:
            out.extend(braceexpand.braceexpand(part))
        except braceexpand.UnbalancedBracesError:
            raise StageError(_unbalanced(urls)) from None
    if not out:
        raise StageError(f"webdataset urls {urls!r}: no URL to read")
    return out


def _unbalanced(urls: str) -> str:
    return (f"webdataset urls {urls!r}: unbalanced braces; write alternatives as {{a,b}} and ranges as "
            "{000..009}, and separate whole URLs with commas outside braces")


# ------------------------------------------------------------------------------ webdataset


@dataclass
class _Members:
    """The members of one webdataset sample: bytes per extension, and why any were not used."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)


def _member_problem(member: tarfile.TarInfo, group: _Members, ext: str) -> str:
    """Why a member of a sample is not read ("" when it is: a regular file, new, within the limit)."""
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hard link"
        return f"{member.name} is a {kind} to {member.linkname!r}: links are never followed"
    if not member.isfile():
        return f"{member.name} is not a regular file (a FIFO or device): not read"
    if member.size > MAX_FILE_BYTES:
        return f"{member.name} has {member.size} bytes, more than {MAX_FILE_BYTES}: not read"
    if ext in group.files:
        return f"{member.name}: the sample already has a .{ext} member (names differ only in case?)"
    return ""


class _TarInfo(tarfile.TarInfo):
    """Remembers on its TarFile why reading stopped: tarfile ends quietly at a bad header."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as err:
            tarfile_.llm2clip_end = err
            raise


def _check_stopped_at_marker(tar: tarfile.TarFile) -> None:
    """Raise unless tarfile stopped at an end-of-archive marker (a zero block).

    Raises:
        tarfile.ReadError: a truncated or corrupt header stopped it: the rest would be lost silently.
    """
    end = getattr(tar, "llm2clip_end", None)
    if end is not None and not isinstance(end, tarfile.EOFHeaderError):
        raise tarfile.ReadError(f"the archive stops at byte {tar.offset} ({type(end).__name__}: {end}) instead "
                                "of at an end-of-archive marker; anything after it is not read")


def _check_only_zeros_follow(tar: tarfile.TarFile) -> None:
    """Raise when data follows the end-of-archive marker.

    Raises:
        tarfile.ReadError: concatenated tars or a header overwritten with zeros: samples there would be
            lost silently (reading to the end also lets xz and bz2 verify their checksums).
    """
    while chunk := tar.fileobj.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"data after the end-of-archive marker at byte {tar.offset} (concatenated "
                                    "tar files, or a header overwritten with zeros): the samples there are not read")


def _tar_groups(fileobj) -> Iterator[_Members]:
    """The samples of a tar stream (webdataset rules: key = name up to the first dot of its base
    name, a sample's members are consecutive, folders and names without a dot are not samples).

    Why not ``webdataset``'s reader: these tars come from outside (img2dataset shards, anyone's
    upload), and its reader hands over links and devices, reads a truncated or concatenated tar
    as a shorter one, and raises on a broken header without saying which samples came before.
    This one reports each of those as a quarantine problem naming the sample (docs/reliability.md,
    fuzzed in tests/unit/data/test_fuzz_*.py). Our own shards are read by
    :func:`llm2clip.data.shards.iter_groups`.

    Raises:
        tarfile.TarError, OSError, EOFError: the stream broke or does not end as a tar does; the
            sample being read is yielded first, with an ``unreadable_shard`` problem.
    """
    group: _Members | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_TarInfo) as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if member.isdir() or base.startswith(".") or "." not in base:
                    continue
                ext = base.split(".", 1)[1]
                if group is None or member.name[: -len(ext) - 1] != group.key:
                    if group is not None:
                        yield group
                    group = _Members(member.name[: -len(ext) - 1])
                if problem := _member_problem(member, group, ext.lower()):
                    group.problems.append((R.BAD_MEMBER, problem))
                else:
                    group.files[ext.lower()] = tar.extractfile(member).read()
            _check_stopped_at_marker(tar)
            if group is not None:  # complete: the archive ended at its marker
                yield group
                group = None
            _check_only_zeros_follow(tar)
    except (OSError, tarfile.TarError, EOFError) as err:
        if group is not None:
            group.problems.append((R.UNREADABLE_SHARD, f"the shard broke while this sample was read (members "
                                                       f"{sorted(group.files)} read): {type(err).__name__}: {err}"))
            yield group
        raise


def _wds_caption(files: dict[str, bytes], spec: str, meta: Any) -> Any:
    """The raw value of a caption or label (``txt``, ``json:<key>``); None when absent.

    Raises:
        UnicodeDecodeError: a text member is not UTF-8 (never replaced silently).
    """
    if spec.startswith("json:"):
        return meta.get(spec[5:]) if isinstance(meta, dict) else None
    data = files.get(spec.lower())
    return data.decode("utf-8") if data is not None else None


def _wds_sample(src: WebDatasetSource, url: str, group: _Members) -> RawSample:
    key, files = group.key, group.files
    sample = RawSample(source=src.name, source_id=f"{url}#{key}", key=make_key(src.name, key))
    if group.problems:
        sample.error = (group.problems[0][0], "; ".join(detail for _, detail in group.problems))
        return sample
    meta: Any = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, RecursionError) as err:  # RecursionError: [[[[... nested too deep
            sample.error = (R.BAD_METADATA, f"{key}.json is not valid JSON: {type(err).__name__}: {err}")
            return sample
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        sample.error = (R.MISSING_IMAGE, f"no {'/'.join(IMAGE_EXTENSIONS)} member (has {sorted(files)})")
        return sample
    sample.image = files[ext]
    try:
        sample.captions = {name: _wds_caption(files, spec, meta) for name, spec in src.caption_fields.items()}
        label = _wds_caption(files, src.label_field, meta) if src.label_field else None
    except UnicodeDecodeError as err:
        member = next((f"{key}.{e}" for e, data in files.items() if data is err.object), key)
        sample.error = (R.BAD_ENCODING, f"{member}: byte 0x{err.object[err.start]:02x} at {err.start} is not "
                                        f"valid UTF-8 ({err.reason}); text members must be UTF-8")
        return sample
    sample.optional = frozenset(src.optional_captions)
    sample.label = None if label is None else str(label)
    return sample


def iter_webdataset(src: WebDatasetSource, endpoint_url: str = "") -> Iterator[RawSample]:
    """Samples of img2dataset-style shards; an unreadable shard becomes one quarantine record."""
    for url in expand_urls(src.urls):
        n = 0
        try:
            with _open(url, endpoint_url) as f:
                for group in _tar_groups(f):
                    n += 1
                    yield _wds_sample(src, url, group)
        except (OSError, tarfile.TarError, EOFError) as err:
            log.warning("source %r: shard %s unreadable after %d samples: %s", src.name, url, n, err)
            yield RawSample(
                source=src.name, source_id=url, key=make_key(src.name, f"shard-{url}"),
                error=(R.UNREADABLE_SHARD, f"{type(err).__name__}: {err} (after {n} samples)"),
            )


# -------------------------------------------------------------------------------- manifest

_CSV_FIELD_LIMIT = 2**31 - 1  # largest bound every platform's C long takes
_FALLBACK_ENCODING = "cp1252"
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes surrogateescape could not decode
_VALID_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")


def _no_manifest(src: ManifestSource, index: int | None = None) -> str:
    where = f"prepare_data.sources[{index}] ({src.name})" if index is not None else f"source {src.name!r}"
    return (f"{where}: manifest {src.path} does not exist or is not a file; fix the source's path "
            f"(e.g. --set prepare_data.sources.{index if index is not None else 'N'}.path=...)")


@dataclass
class Decoded:
    """A manifest's text and how it was read.

    Attributes:
        text: The decoded text; bytes not valid in ``encoding`` are lone surrogates
            U+DC80..U+DCFF (``surrogateescape``), never silently replaced.
        encoding: The codec used.
        undecodable: How many such bytes there are.
    """

    text: str
    encoding: str
    undecodable: int = 0


def _decode_as(data: bytes, encoding: str, path: str) -> Decoded:
    try:
        text = data.decode(encoding, errors="surrogateescape")
    except UnicodeDecodeError as err:  # codecs whose errors surrogateescape cannot carry (UTF-16)
        raise StageError(f"{path}: cannot be read as {encoding} ({err}); set the source's encoding to "
                         "the file's encoding (e.g. utf-8, cp1252, utf-16)") from None
    return Decoded(text.removeprefix("\ufeff"), encoding, len(_ESCAPED.findall(text)))


def decode_manifest(data: bytes, encoding: str, path: str) -> Decoded:
    """Decode a manifest (see ``ManifestSource.encoding``); the fallback is logged with counts."""
    if encoding != "auto":
        return _decode_as(data, encoding, path)
    if data.startswith(codecs.BOM_UTF8):
        return _decode_as(data, "utf-8-sig", path)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decode_as(data, "utf-16", path)
    decoded = _decode_as(data, "utf-8", path)
    if decoded.undecodable and not _VALID_NON_ASCII.search(decoded.text):
        try:  # not UTF-8 at all (no single valid multi-byte character): a legacy 8-bit file
            text = data.decode(_FALLBACK_ENCODING)
        except UnicodeDecodeError:
            return decoded  # not cp1252 either: its bad rows are quarantined
        chars = [ch for ch in text if ord(ch) > 127]
        log.warning(
            "%s is not UTF-8: read as %s, %d non-ASCII character(s) (e.g. %s); set the source's "
            "encoding (e.g. encoding: latin-1) if that is not the file's encoding",
            path, _FALLBACK_ENCODING, len(chars), "".join(sorted(set(chars))[:12]),
        )
        return Decoded(text, _FALLBACK_ENCODING)
    return decoded


def _encoding_error(text: str, n: int, encoding: str) -> tuple[str, str] | None:
    """``(bad_encoding, detail)`` when ``text`` (one row) holds undecodable bytes, else None."""
    bad = _ESCAPED.findall(text)
    if not bad:
        return None
    shown = " ".join(f"0x{ord(ch) - 0xDC00:02x}" for ch in bad[:4])
    return (R.BAD_ENCODING, f"line {n}: {len(bad)} byte(s) not valid {encoding} ({shown}); set the "
                            "source's encoding to the file's encoding (e.g. encoding: cp1252)")


Row = tuple[int, dict | None, tuple[str, str] | None]  # (first line, row, (reason, detail) or None)


_LINE_BREAK = re.compile("\r\n|\r|\n")  # not splitlines(): U+2028 is data; JSON has no raw CR or LF
_SENTINEL = "\x00llm2clip-end-of-file\x00"


def _jsonl_rows(decoded: Decoded) -> Iterator[Row]:
    for n, line in enumerate(_LINE_BREAK.split(decoded.text), start=1):
        if not line.strip():
            continue
        if error := _encoding_error(line, n, decoded.encoding):
            yield n, None, error
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:  # RecursionError: [[[[... nested too deep
            yield n, None, (R.BAD_METADATA, f"line {n} is not valid JSON: {type(err).__name__}: {err}")
            continue
        yield (n, row, None) if isinstance(row, dict) else (n, None, (R.BAD_METADATA, f"line {n} is not an object"))


def _unclosed(lines: list[str]) -> bool:
    """True when the CSV record that starts ``lines`` ends inside a quoted field at the end of the file."""
    probe = next(csv.reader([*lines, "\n", _SENTINEL + "\n"]), [])
    return any(_SENTINEL in value for value in probe)


def _csv_records(lines: list[str]) -> Iterator[tuple[int, list[str] | None, str]]:
    """``(first line, values or None, csv error)`` of every CSV record in ``lines``.

    A quoted field still open at the end of the file (a stray ``"``) would swallow every line after
    its own: that record becomes an error and reading resumes on the line after its first one.
    """
    first = 1
    while first <= len(lines):
        reader, end = csv.reader(lines[first - 1:]), first - 1
        while True:  # until the reader ends (return) or a record runs off the end (break: read on)
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield end + 1, None, str(err)
                end = first - 1 + reader.line_num
                continue
            start, end = end + 1, first - 1 + reader.line_num
            if end == len(lines) and values and _unclosed(lines[start - 1:]):
                yield start, None, ("a quoted field opened on this line is never closed (a stray '\"'?); the "
                                    "lines after it are read as rows of their own: fix the quoting")
                first = start + 1
                break
            yield start, values, ""


def _shown(header: list[str]) -> list[str]:
    """The header as an error message shows it (no giant column names)."""
    return [name if len(name) <= 60 else f"{name[:57]}..." for name in header[:40]]


def _csv_rows(src: ManifestSource, decoded: Decoded) -> Iterator[Row]:
    """CSV rows as dicts; a row's number is the line it starts on (quoted newlines allowed)."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:  # a giant caption is validated, not a crash
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    records = _csv_records(io.StringIO(decoded.text, newline="").readlines())
    header = next(records, (1, [], ""))[1] or []
    needed = [src.image_column, *src.caption_columns.values(), *filter(None, [src.key_column])]
    missing = [c for c in needed if c not in header]
    if missing:
        nul = "\x00" in "".join(header)
        utf16 = " (NUL bytes: UTF-16 without a byte-order mark? set encoding: utf-16)" if nul else ""
        raise StageError(
            f"{src.path}: column(s) {missing} not found (columns: {_shown(header)}){utf16}; "
            f"fix the manifest or the source's image_column/caption_columns/key_column"
        )
    for start, values, csv_error in records:
        if values is None:
            yield start, None, (R.BAD_METADATA, f"line {start}: {csv_error}")
        elif values:
            error = _encoding_error("\x00".join(values), start, decoded.encoding)
            yield start, None if error else dict(zip(header, values, strict=False)), error


def _manifest_rows(src: ManifestSource, endpoint_url: str) -> Iterator[Row]:
    """``(line_no, row or None, error)`` of a CSV or JSONL manifest.

    Raises:
        StageError: the manifest does not exist, a needed CSV column is missing or the file
            cannot be decoded at all.
    """
    try:
        data = _read_bytes(src.path, endpoint_url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, NotAFileError):
        raise StageError(_no_manifest(src)) from None
    except PermissionError as err:
        raise StageError(f"source {src.name!r}: no permission to read manifest {src.path} ({err}); "
                         "fix the file's permissions or the credentials") from None
    except (OSError, ValueError) as err:  # a symlink loop, a name too long, a NUL in the path
        raise StageError(f"source {src.name!r}: cannot read manifest {src.path!r}: {type(err).__name__}: "
                         f"{err}; fix the source's path") from None
    decoded = decode_manifest(data, src.encoding, src.path)
    if decoded.undecodable:
        log.warning("%s: %d byte(s) are not valid %s; their rows are quarantined as %s (set the "
                    "source's encoding if the file has another one)", src.path, decoded.undecodable,
                    decoded.encoding, R.BAD_ENCODING)
    if src.path.lower().endswith((".jsonl", ".ndjson", ".json")):
        return _jsonl_rows(decoded)
    return _csv_rows(src, decoded)


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


@dataclass
class _Group:
    """The rows of one sample (one key): first line, image, label, merged captions."""

    line: int
    key: str
    image: Any
    label: str | None
    captions: dict[str, list[Any]] = field(default_factory=dict)
    rows: int = 1

    def add(self, name: str, value: Any) -> None:
        """Append a raw caption value (a list is flattened); None, "" and exact repeats are skipped."""
        kept = self.captions.setdefault(name, [])
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v != "" and v not in kept:
                kept.append(v)


def _row_group(src: ManifestSource, n: int, row: dict) -> _Group:
    image = row.get(src.image_column)
    raw_key = row.get(src.key_column) if src.key_column else None
    raw_id = "" if raw_key in (None, "") else str(raw_key)  # a JSON id 0 is an id
    if not raw_id and isinstance(image, str):
        raw_id = os.path.splitext(image)[0]
    label = row.get(src.label_column) if src.label_column else None
    group = _Group(n, make_key(src.name, raw_id or f"line-{n}"), image, None if label in (None, "") else str(label))
    for name, column in src.caption_columns.items():
        group.add(name, row.get(column))
    return group


def _conflict(first: _Group, row: _Group, src: ManifestSource) -> str:
    """Why ``row`` cannot merge into ``first`` (same key), or "" when it can."""
    what = []
    if row.image != first.image:
        what.append(f"image {row.image!r} (line {first.line}: {first.image!r})")
    if None not in (row.label, first.label) and row.label != first.label:
        what.append(f"label {row.label!r} (line {first.line}: {first.label!r})")
    if not what:
        return ""
    fix = ("give each sample its own id in key_column" if src.key_column
           else "set key_column to a column with one id per image")
    return (f"line {row.line}: key {row.key} is already used by line {first.line}, but this row has "
            f"another {' and '.join(what)}; rows of one sample must agree on image and label: fix the row "
            f"or {fix}")


def merge_rows(src: ManifestSource, rows: Iterator[Row]) -> list[_Group | RawSample]:
    """Group manifest rows by key in file order: one entry per sample or unusable row.

    Rows sharing a key (one row per caption, COCO / Flickr style) merge into the first one's
    group, their captions appended per name; a row that disagrees on image or label becomes a
    ``duplicate_key`` RawSample naming both lines.
    """
    entries: list[_Group | RawSample] = []
    groups: dict[str, _Group] = {}
    n_rows = 0
    for n, row, error in rows:
        n_rows += 1
        if row is None:
            entries.append(RawSample(src.name, f"{src.path}:{n}", make_key(src.name, f"line-{n}"),
                                     error=error, line=n))
            continue
        group = _row_group(src, n, row)
        first = groups.setdefault(group.key, group)
        if first is group:
            entries.append(group)
        elif detail := _conflict(first, group, src):
            entries.append(RawSample(src.name, f"{src.path}:{n}", group.key, error=(R.DUPLICATE_KEY, detail), line=n))
        else:
            first.rows += 1
            first.label = first.label or group.label
            for name, values in group.captions.items():
                first.add(name, values)
    merged = sum(g.rows - 1 for g in groups.values())
    log.info("source %r: %d row(s) of %s -> %d sample(s) (%d row(s) merged into the sample of their key)",
             src.name, n_rows, src.path, len(groups), merged)
    return entries


def _group_sample(src: ManifestSource, group: _Group, endpoint_url: str) -> RawSample:
    where = f"{src.path}:{group.line}"
    image = group.image
    sample = RawSample(src.name, str(image) if image else where, group.key, label=group.label,
                       line=group.line, optional=frozenset(src.optional_captions))
    sample.captions = {name: group.captions.get(name, []) for name in src.caption_columns}
    if not isinstance(image, str) or not image:
        sample.error = (R.MISSING_IMAGE, f"{where}: no value in column {src.image_column!r}")
        return sample
    try:
        sample.image = _read_bytes(_image_path(src, image), endpoint_url, MAX_FILE_BYTES)
    except (OSError, ValueError) as err:
        sample.error = (R.MISSING_IMAGE, f"{where}: cannot read {image}: {type(err).__name__}: {err}")
    return sample


def parse_manifest(src: ManifestSource, endpoint_url: str = "") -> list:
    """A manifest's rows merged by key (:func:`merge_rows`), images not read yet: each entry is a
    sample to be (:func:`entry_sample`) or an already rejected :class:`RawSample`.

    Raises:
        StageError: see :func:`_manifest_rows`.
    """
    return merge_rows(src, _manifest_rows(src, endpoint_url))


def entry_sample(src: ManifestSource, entry: Any, endpoint_url: str = "") -> RawSample:
    """The sample of one :func:`parse_manifest` entry, its image read now."""
    return entry if isinstance(entry, RawSample) else _group_sample(src, entry, endpoint_url)


def iter_manifest(src: ManifestSource, endpoint_url: str = "") -> Iterator[RawSample]:
    """Samples of a CSV/JSONL manifest plus an image folder (local or ``s3://``).

    Rows of one key are one sample (see :func:`merge_rows`); every sample and rejection carries
    the manifest line it starts on.

    Raises:
        StageError: see :func:`_manifest_rows`.
    """
    for entry in parse_manifest(src, endpoint_url):
        yield entry_sample(src, entry, endpoint_url)
