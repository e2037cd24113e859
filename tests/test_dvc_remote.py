"""dvc.lock committed, outputs on an S3 remote (moto server): a fresh clone pulls them and
`dvc repro` there is a no-op.

Starts from the clean clone after one `dvc repro` of the tiny pipeline that tests/test_dvc.py
uses too (the session fixture ``reproduced`` of tests/conftest.py: one repro for both). The origin commits
what `dvc repro` wrote for git (dvc.lock, the outputs' .gitignore entries) and the remote
(endpoint and region in .dvc/config; its keys in the uncommitted .dvc/config.local), and pushes;
the clone gets its keys from the environment only.
"""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from test_dvc import BIN, REPO, dvc, dvc_env, outs, run


def tree_digests(root: Path, paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths``, keyed by its path relative to ``root``."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_a_fresh_clone_pulls_the_outputs_and_repro_is_a_no_op(reproduced, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    origin = Path(shutil.copytree(reproduced, tmp_path / "origin", symlinks=True))
    dvc(["remote", "add", "-d", "store", f"s3://{bucket}/dvc"], origin)
    dvc(["remote", "modify", "store", "endpointurl", endpoint], origin)
    dvc(["remote", "modify", "store", "region", "us-east-1"], origin)
    dvc(["remote", "modify", "--local", "store", "access_key_id", "test"], origin)
    dvc(["remote", "modify", "--local", "store", "secret_access_key", "test"], origin)
    env = dvc_env(tmp_path)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-qm", "dvc repro: dvc.lock, the remote"], origin, env)
    tracked = run(["git", "ls-files"], origin).split()
    assert "dvc.lock" in tracked and ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    assert not [t for o in outs(origin) for t in tracked if t.startswith(str(o.relative_to(origin)) + "/")]
    config = (origin / ".dvc" / "config").read_text()
    assert endpoint in config and "access_key_id" not in config and "secret_access_key" not in config
    dvc(["push"], origin)
    assert json.loads(dvc(["status", "--cloud", "--json"], origin)) == {}  # the remote has all dvc.lock names

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not any(o.exists() for o in outs(clone)) and not (clone / ".dvc" / "config.local").exists()
    keys = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    run([str(BIN / "dvc"), "pull"], clone, {**dvc_env(tmp_path), **keys})
    assert tree_digests(clone, outs(clone)) == tree_digests(origin, outs(origin))
    assert json.loads(dvc(["status", "--json"], clone)) == {}
    again = dvc(["repro"], clone)
    assert "Running stage" not in again, again
    assert run(["git", "status", "--porcelain"], clone).strip() == ""  # dvc.lock unchanged, nothing new
    assert tree_digests(clone, outs(clone)) == tree_digests(origin, outs(origin))


def test_dvc_lock_is_committed_exactly_when_a_default_remote_is():
    """A committed dvc.lock names outputs by hash: the promise that a clone can `dvc pull` them,
    which only a default remote every clone can reach keeps (.dvc/config ``core.remote``; its
    credentials from the environment). Without one a clone can only rerun everything, and a
    committed lock would be stale after every code change. README: "Locally with DVC"."""
    proc = subprocess.run([str(BIN / "dvc"), "config", "--project", "core.remote"], cwd=REPO,
                          capture_output=True, text=True, env=dvc_env(REPO))
    remote = proc.stdout.strip() if proc.returncode == 0 else ""
    committed = run(["git", "ls-files", "dvc.lock"], REPO).strip() == "dvc.lock"
    assert committed == bool(remote), (
        "dvc.lock is committed but .dvc/config names no default remote: `dvc remote add -d` one every clone "
        "can reach (and `dvc push`), or `git rm --cached dvc.lock`" if committed else
        f".dvc/config names the default remote {remote!r}: commit dvc.lock after `dvc repro` and `dvc push` it")
