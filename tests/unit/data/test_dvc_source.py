"""The ``dvc`` source kind on a real git + DVC repository (tests/dvc_data_repo.py: tags v1, v2)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from dvc_data_repo import BIN, make_data_repo, sh

from llm2clip.config import CommonConfig, ConfigError, DvcSource, ManifestSource, PrepareDataConfig, from_dict
from llm2clip.data.dvc_source import shard_names, shard_samples
from llm2clip.data.sources import open_source
from llm2clip.io import StageError

FIELDS = ("short", "dense")
MANIFEST = {"kind": "manifest", "path": "manifest.csv", "caption_columns": {"short": "short", "dense": "dense"}}
SHARDS = {"kind": "webdataset", "urls": "shard-{000..001}.tar",
          "caption_fields": {"short": "txt", "dense": "json:dense"}}


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    """``(repo path, {tag: commit})``; every version's data is in the repo's local DVC cache."""
    repo = tmp_path_factory.mktemp("dvc_source") / "data-repo"
    return repo, make_data_repo(repo)


def source(repo, rev="", path="data/photos", inner=None, name="photos") -> DvcSource:
    return from_dict(DvcSource, {"name": name, "repo": str(repo), "rev": rev, "path": path,
                                 "inner": inner or MANIFEST})


def read(src: DvcSource, **common):
    reader = open_source(src, CommonConfig(caption_fields=FIELDS, tracking=False, **common))
    return reader, list(reader.samples)


def versions_read(samples) -> set[str]:
    return {caption.split(" ", 1)[0] for s in samples for values in s.captions.values()
            for caption in ([values] if isinstance(values, str) else values)}


@pytest.mark.parametrize("inner", [MANIFEST, SHARDS], ids=["manifest", "webdataset"])
def test_each_revision_reads_its_own_content_and_records_its_commit(data_repo, inner):
    repo, commits = data_repo
    path = "data/photos" if inner is MANIFEST else "data/shards"
    first, first_samples = read(source(repo, "v1", path, inner))
    second, second_samples = read(source(repo, commits["v2"], path, inner))
    assert versions_read(first_samples) == {"v1"} and versions_read(second_samples) == {"v2"}
    assert (len(first_samples), len(second_samples)) == (6, 5)
    assert all(s.error is None and s.image for s in first_samples + second_samples)
    assert first.lineage == {"repo": str(repo), "rev": "v1", "commit": commits["v1"], "path": path}
    assert second.lineage["commit"] == commits["v2"]
    # samples are keyed by the dvc source's name; no temporary path reaches what is kept
    assert all(s.source == "photos" and s.key.startswith("photos-") for s in first_samples)
    assert [s.key for s in first_samples[:5]] == [s.key for s in second_samples]
    if inner is SHARDS:
        assert first_samples[0].source_id == f"{repo}@{commits['v1']}/data/shards/shard-000.tar#s000"
    assert not any("llm2clip-dvc-" in s.source_id for s in first_samples)


def test_a_branch_is_resolved_once_when_opened_and_the_reader_stays_on_that_commit(data_repo, tmp_path):
    """A moved branch is visible (the lineage names the commit, not only the branch), and a
    branch that moves after the source was opened changes nothing: the reader and its ``pinned``
    source (what a worker or a rerun reads) stay on the commit it was opened at."""
    repo, commits = data_repo
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    shutil.copytree(repo / ".dvc" / "cache", clone / ".dvc" / "cache")  # the same local cache
    sh(["git", "branch", "-f", "data", "v1"], clone)
    common = CommonConfig(caption_fields=FIELDS, tracking=False)
    before = open_source(source(clone, "data"), common)
    sh(["git", "branch", "-f", "data", "v2"], clone)  # moves after the open, before the read
    assert versions_read(list(before.samples)) == {"v1"} and before.lineage["commit"] == commits["v1"]
    assert before.pinned == source(clone, commits["v1"])
    assert versions_read(list(open_source(before.pinned, common).samples)) == {"v1"}
    after, samples = read(source(clone, "data"))
    assert versions_read(samples) == {"v2"} and after.lineage["commit"] == commits["v2"]
    assert before.lineage["rev"] == after.lineage["rev"] == "data"


def test_one_shard_of_a_pinned_source_reads_as_the_whole_source_does(data_repo):
    repo, commits = data_repo
    reader, whole = read(source(repo, "v1", "data/shards", SHARDS))
    common = CommonConfig(caption_fields=FIELDS, tracking=False)
    names = shard_names(reader.pinned)
    assert names == ["shard-000.tar", "shard-001.tar"]
    parts = [s for name in names for s in shard_samples(reader.pinned, name, common)]
    assert [(s.key, s.source_id, s.captions, s.image) for s in parts] == \
        [(s.key, s.source_id, s.captions, s.image) for s in whole]


def test_common_data_revision_is_the_default_rev(data_repo):
    repo, commits = data_repo
    reader, samples = read(source(repo, ""), data_revision="v1")
    assert versions_read(samples) == {"v1"} and reader.lineage["commit"] == commits["v1"]
    reader, samples = read(source(repo, "v2"), data_revision="v1")  # the source's own rev wins
    assert versions_read(samples) == {"v2"}


@pytest.mark.parametrize(("change", "message"), [
    ({"rev": ""}, "no revision to read at: set the source's rev, or common.data_revision"),
    ({"rev": "v9"}, "cannot open it at revision 'v9'"),
    ({"path": "data/nothing"}, "data/nothing is not a folder of the repository at v1"),
    ({"inner": {**MANIFEST, "path": "other.csv"}}, "other.csv is not a file in"),
    ({"inner": {**MANIFEST, "caption_columns": {"short": "short"}}}, "maps ['short'], but common.caption_fields"),
    ({"path": "data/shards", "inner": {**SHARDS, "urls": "shard-{000..002}.tar"}}, "shard shard-002.tar is not in"),
])
def test_mistakes_are_one_stage_error(data_repo, change, message):
    repo, _ = data_repo
    fields = {"rev": "v1", "path": "data/photos", "inner": MANIFEST} | change
    with pytest.raises(StageError) as err:
        read(source(repo, **fields))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_clone_without_the_data_reads_it_from_the_s3_remote_with_credentials_from_the_environment(
        s3_bucket, tmp_path, monkeypatch):
    """No DVC cache, remote endpoint in the committed .dvc/config, keys only in the environment."""
    endpoint, bucket = s3_bucket
    origin = tmp_path / "origin"
    commits = make_data_repo(origin, remote=(endpoint, bucket))
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / ".dvc" / "cache").exists() and "secret" not in (clone / ".dvc" / "config").read_text()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    reader, samples = read(source(clone, "v1"))
    assert versions_read(samples) == {"v1"} and len(samples) == 6 and reader.lineage["commit"] == commits["v1"]
    reader, samples = read(source(clone, "v2", "data/shards", SHARDS))
    assert versions_read(samples) == {"v2"} and len(samples) == 5
    # a remote that lacks the data (here: another prefix, set in the clone's uncommitted config.local)
    sh([str(BIN / "dvc"), "remote", "modify", "--local", "store", "url", f"s3://{bucket}/elsewhere"], clone)
    with pytest.raises(StageError, match="is the data pushed to the repository's DVC remote, and are its credentials"):
        read(source(clone, "v1"))


def test_config_parses_as_a_prepare_data_source_and_keeps_paths_inside_the_repo():
    cfg = from_dict(PrepareDataConfig, {"sources": [
        {"kind": "dvc", "name": "photos", "repo": "https://example.invalid/data.git", "rev": "v1",
         "path": "data/photos", "inner": MANIFEST}]})
    (src,) = cfg.sources
    assert isinstance(src, DvcSource) and isinstance(src.inner, ManifestSource)
    assert src.inner.caption_columns == {"short": "short", "dense": "dense"}
    for bad in ({"repo": ""}, {"path": "/abs"}, {"path": "../up"}, {"inner": {**MANIFEST, "path": "s3://b/m.csv"}},
                {"inner": {**MANIFEST, "image_root": "../img"}}, {"inner": {**SHARDS, "urls": "{a,/etc/b}.tar"}},
                {"inner": {**SHARDS, "urls": ""}}):
        with pytest.raises(ConfigError, match="dvc source 'photos'"):
            from_dict(DvcSource, {"name": "photos", "repo": "r", "inner": MANIFEST} | bad)


def test_the_library_does_not_import_dvc_until_a_dvc_source_is_opened():
    code = ("import sys, llm2clip.config, llm2clip.data.sources, llm2clip.data.dvc_source, llm2clip.stages."
            "prepare_data; assert not [m for m in sys.modules if m == 'dvc' or m.startswith('dvc.')], 'dvc imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
