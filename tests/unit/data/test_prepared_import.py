"""Starting from a DVC-versioned prepared dataset: prepare_data's output, tracked with ``dvc add``
in a git + DVC repository, is copied at a revision byte for byte (real git and dvc), checked, and
refused when it is not a complete prepare_data output."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dvc_data_repo import BIN, make_data_repo, sh  # noqa: E402

from llm2clip.config import CommonConfig, PrepareDataConfig, SyntheticSource  # noqa: E402
from llm2clip.io import StageError  # noqa: E402
from llm2clip.stages import prepare_data  # noqa: E402

COMMON = CommonConfig(tracking=False)


def sums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def versioned(tmp_path_factory):
    """A data repository whose commit ``prepared-1`` tracks a prepare_data output at data/prepared."""
    repo = tmp_path_factory.mktemp("prepared") / "repo"
    make_data_repo(repo)
    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=24, image_size=48),), shard_size=8,
                            image_max_side=48)
    prepare_data.run(cfg, COMMON, data=str(repo / "data" / "prepared"))
    sh([str(BIN / "dvc"), "add", "-q", "data/prepared"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "prepared data"], repo)
    sh(["git", "tag", "prepared-1"], repo)
    commit = sh(["git", "rev-parse", "HEAD"], repo).strip()
    return repo, commit, sums(repo / "data" / "prepared")


def test_the_prepared_output_is_copied_at_the_revision_byte_for_byte(versioned, tmp_path):
    repo, commit, want = versioned
    lineage = prepare_data.run_import(replace(COMMON, data_revision="prepared-1"), repo=str(repo),
                                      path="data/prepared", data=str(tmp_path / "data"))
    assert lineage == {"repo": str(repo), "rev": "prepared-1", "commit": commit, "path": "data/prepared"}
    assert sums(tmp_path / "data") == want


def test_what_is_not_a_prepared_output_is_refused_in_one_line(versioned, tmp_path):
    repo, _, _ = versioned
    common = replace(COMMON, data_revision="prepared-1")
    with pytest.raises(StageError, match=r"data/photos at prepared-1 \(commit \w+\) is not a usable prepare_data"):
        prepare_data.run_import(common, repo=str(repo), path="data/photos", data=str(tmp_path / "a"))
    with pytest.raises(StageError, match="v1 .* no such .*|data/prepared is not a folder of the repository at v1"):
        prepare_data.run_import(replace(COMMON, data_revision="v1"), repo=str(repo), path="data/prepared",
                                data=str(tmp_path / "b"))
    with pytest.raises(StageError, match="no revision to read at"):
        prepare_data.run_import(COMMON, repo=str(repo), path="data/prepared", data=str(tmp_path / "c"))
    assert not (tmp_path / "a" / "manifest.json").exists()
