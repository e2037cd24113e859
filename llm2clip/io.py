"""Small I/O helpers every stage shares: atomic writes, checksums, local-or-S3 paths.

Atomic means temp file in the same directory + ``os.replace``: a reader sees the old file or
the new one, never half of one, and a crash leaves at most a ``*.tmp-*`` file that the next run
overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A stage cannot go on; the message says what was wrong and what to do about it."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as ``s3://bucket/key``."""
    return "://" in str(path)


S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
"""botocore's retry config for every S3 request: 5 tries in all (the first and 4 retries) with
exponential backoff and jitter on 500/502/503/504, throttling (SlowDown) and dropped connections;
``$AWS_RETRY_MODE`` and ``$AWS_MAX_ATTEMPTS`` (botocore's meaning: tries in all) override it. s3fs
retries a failed call a few more times on top. (``max_attempts`` in a botocore config counts
retries only: 5 there would be 6 tries, and not what ``$AWS_MAX_ATTEMPTS=5`` means.)"""


def s3_retry_env() -> dict[str, str]:
    """:data:`S3_RETRIES` as botocore's environment variables, for the S3 clients that llm2clip does not
    build itself: MLflow's S3 artifact repository, in this process (``llm2clip.registry`` sets them
    unless set) or in an ``mlflow server`` that proxies artifacts to S3 (set them in its environment)."""
    return {"AWS_RETRY_MODE": str(S3_RETRIES["mode"]), "AWS_MAX_ATTEMPTS": str(S3_RETRIES["total_max_attempts"])}


def s3_filesystem(endpoint_url: str = ""):
    """An fsspec S3 filesystem (credentials from the environment / AWS profile)."""
    import fsspec

    client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
    retries = {"mode": os.environ.get("AWS_RETRY_MODE", S3_RETRIES["mode"]),
               "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", S3_RETRIES["total_max_attempts"]))}
    return fsspec.filesystem("s3", client_kwargs=client_kwargs,
                             config_kwargs={"retries": retries, "connect_timeout": 10, "read_timeout": 60})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are read by other users/containers
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike, endpoint_url: str = "") -> dict[str, Any]:
    """Read ``<directory>/manifest.json`` (local or S3) or raise a StageError saying what to run."""
    if is_remote(directory):
        fs = s3_filesystem(endpoint_url)
        url = f"{str(directory).rstrip('/')}/manifest.json"
        if not fs.exists(url):
            raise StageError(f"{url} not found: the stage that writes {directory} has not finished")
        return json.loads(fs.cat(url))
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path} not found: the stage that writes {directory} has not finished")
    return json.loads(path.read_text())


@contextlib.contextmanager
def output_dir(target: str | os.PathLike, endpoint_url: str = "") -> Iterator[Path]:
    """A local directory to write an output into; mirrored to ``target`` when it is ``s3://``.

    Local targets are written in place (stages write each file atomically and ``manifest.json``
    last, so a directory without a manifest is an unfinished one). For S3 targets the files are
    uploaded when the block ends, ``manifest.json`` last.
    """
    if not is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    staging = Path(tempfile.mkdtemp(prefix="llm2clip-out-"))
    try:
        yield staging
        upload_dir(staging, str(target), endpoint_url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def upload_dir(local: Path, url: str, endpoint_url: str = "") -> None:
    """Upload every file under ``local`` to ``url``; ``manifest.json`` goes last (commit mark)."""
    fs = s3_filesystem(endpoint_url)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "manifest.json")
    for p in files:
        fs.put_file(str(p), f"{url.rstrip('/')}/{p.relative_to(local).as_posix()}")


def dir_fingerprint(directory: str | os.PathLike, endpoint_url: str = "") -> str:
    """sha256 of a stage output's manifest.json (which lists the checksums of its files)."""
    manifest = read_manifest(directory, endpoint_url)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def subdirectories(parent: str | os.PathLike, endpoint_url: str = "") -> list[str]:
    """The sub-folders of ``parent`` (local or ``s3://``), sorted; none when it does not exist.

    How a folder of per-eval-set outputs (``data/eval/<name>``) becomes the list of directories
    that a KFP task receives as a collected input.
    """
    base = str(parent).rstrip("/")
    if is_remote(base):
        fs = s3_filesystem(endpoint_url)
        if not fs.exists(base):
            return []
        return sorted(f"s3://{p}" for p in fs.ls(base, detail=False) if fs.isdir(p))
    if not os.path.isdir(base):
        return []
    return sorted(str(p) for p in Path(base).iterdir() if p.is_dir())
