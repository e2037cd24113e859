"""A git + DVC data repository for the ``dvc`` source tests, made with the real git and dvc CLIs.

``data/photos`` (DVC-tracked): ``manifest.csv`` (image, short, dense) + ``img/NNN.png``, tiny
synthetic scenes. ``data/shards`` (DVC-tracked): two img2dataset-style webdataset shards of the
same scenes. Two commits, tagged ``v1`` and ``v2``: every caption of a version starts with its tag
(``v1 two red circles ...``), and v2 has one scene fewer, so what was read tells which was read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

BIN = Path(sys.executable).parent
VERSIONS = ("v1", "v2")


def git_env() -> dict[str, str]:
    """No AWS credentials of the caller's (tests add their own), no analytics, a fixed author."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    return env


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env or git_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def scenes(count: int, image_size: int = 48) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` synthetic scenes as (png bytes, {short, dense} captions)."""
    from llm2clip.config import SyntheticSource
    from llm2clip.data.synthetic import iter_synthetic

    out = []
    for raw in iter_synthetic(SyntheticSource(name="photos", count=count, image_size=image_size), 0,
                              ("short", "dense")):
        buf = io.BytesIO()
        raw.image.save(buf, "PNG")
        out.append((buf.getvalue(), raw.captions))
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def write_version(repo: Path, version: str, made: list[tuple[bytes, dict[str, str]]]) -> None:
    """The files of one version: the manifest folder and two webdataset shards."""
    kept = made if version == VERSIONS[0] else made[:-1]
    photos, shards = repo / "data" / "photos", repo / "data" / "shards"
    for folder in (photos / "img", shards):
        folder.mkdir(parents=True, exist_ok=True)
    for old in (photos / "img").glob("*.png"):
        old.unlink()
    with open(photos / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "short", "dense"])
        for i, (png, captions) in enumerate(kept):
            (photos / "img" / f"{i:03d}.png").write_bytes(png)
            writer.writerow([f"img/{i:03d}.png", f"{version} {captions['short']}", f"{version} {captions['dense']}"])
    half = (len(kept) + 1) // 2
    for n, part in enumerate((kept[:half], kept[half:])):
        members = []
        for i, (png, captions) in enumerate(part, start=n * half):
            members += [(f"s{i:03d}.png", png), (f"s{i:03d}.txt", f"{version} {captions['short']}".encode()),
                        (f"s{i:03d}.json", json.dumps({"dense": f"{version} {captions['dense']}"}).encode())]
        _tar(shards / f"shard-{n:03d}.tar", members)


def make_data_repo(repo: Path, count: int = 6, remote: tuple[str, str] | None = None) -> dict[str, str]:
    """Create the repository (see the module docstring); returns ``{tag: commit}``.

    Args:
        remote: ``(endpoint_url, bucket)``: an S3 default remote ``store`` at ``s3://bucket/dvc``,
            committed (endpoint and region only; credentials stay in the environment), and every
            version pushed to it.
    """
    repo.mkdir(parents=True)
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    if remote:
        endpoint, bucket = remote
        for args in (["add", "-d", "store", f"s3://{bucket}/dvc"], ["modify", "store", "endpointurl", endpoint],
                     ["modify", "store", "region", "us-east-1"]):
            sh([str(BIN / "dvc"), "remote", *args], repo)
    made = scenes(count)
    commits = {}
    for version in VERSIONS:
        write_version(repo, version, made)
        sh([str(BIN / "dvc"), "add", "-q", "data/photos", "data/shards"], repo)
        sh(["git", "add", "-A"], repo)
        sh(["git", "commit", "-qm", version], repo)
        sh(["git", "tag", version], repo)
        commits[version] = sh(["git", "rev-parse", "HEAD"], repo).strip()
    if remote:  # every tag's data
        sh([str(BIN / "dvc"), "push", "-q", "--all-tags"], repo,
           {**git_env(), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    return commits
