"""`dvc repro` from a clean clone, then a round trip through an S3 remote (moto server).

The clone is the repo's tracked and untracked-but-not-ignored files, committed into a fresh git
repo, with tiny data and models in params.yaml (DVC takes no --set): what a new checkout plus
`make run` sees, all six stages, in a minute or two.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_pipeline import tiny_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 1200) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc_env(workdir: Path) -> dict:
    """No AWS credentials (a remote must use its --local config), the venv's python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
    )
    return env


def dvc(args: list[str], cwd: Path) -> str:
    return run([str(BIN / "dvc"), *args], cwd, dvc_env(cwd.parent))


def small_params(raw: dict, workdir: Path) -> dict:
    """The committed params with tiny data and tiny models in every stage (tests/tiny_pipeline.py).

    caption_contrastive asks for 2 processes, so `python -m llm2clip` starts torchrun itself.
    """
    raw = tiny_params(workdir, raw)
    raw["caption_contrastive"]["nproc_per_node"] = 2
    return raw


def clean_clone(dest: Path, workdir: Path | None = None) -> Path:
    """The repo's files committed into a fresh git repo at ``dest``, tiny params (the tiny model and
    the demo folder in ``workdir``, default ``dest.parent``: clones sharing one get equal params)."""
    listed = run(["git", "ls-files", "-z", "-co", "--exclude-standard"], REPO).split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # tracked files deleted in the work tree are skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = small_params(yaml.safe_load((dest / "params.yaml").read_text()), workdir or dest.parent)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env(dest.parent)
    run(["git", "init", "-q"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "clean clone"], dest, env)
    return dest


def outs(clone: Path) -> list[Path]:
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    return [clone / o for stage in stages.values() for o in stage.get("outs", [])]


def digests(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_repro_from_a_clean_clone(reproduced):
    for out in outs(reproduced):
        assert out.is_dir() and any(out.iterdir()), f"{out} was not produced"
    manifest = json.loads((reproduced / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["counts"]["train"] > 0
    registration = json.loads((reproduced / "models" / "registration" / "registration.json").read_text())
    assert "champion" in registration["aliases"]
    metrics = json.loads(dvc(["metrics", "show", "--json"], reproduced))
    assert "val.mean_R_at_1" in json.dumps(metrics)
    assert (reproduced / "dvc.lock").is_file()
    assert json.loads(dvc(["status", "--json"], reproduced)) == {}
    again = dvc(["repro"], reproduced)
    assert "Running stage" not in again, again
    # The outputs are DVC's, not git's: dvc writes .gitignore entries for them.
    assert run(["git", "check-ignore", "data/prepared"], reproduced).strip() == "data/prepared"


def test_a_repro_killed_in_every_long_stage_ends_where_a_clean_one_does(reproduced):
    """The crash drill's bounded run (tests/kill_drill.py, the ``reproduced`` fixture): one SIGKILL
    inside each long stage, each followed by a new `dvc repro`. test_repro_from_a_clean_clone above
    checks the same clone: status clean, a second repro runs nothing."""
    from kill_drill import PIPELINE_STAGES, verify_outputs

    report = json.loads((reproduced.parent / "kill-report.json").read_text())
    assert [k["stage"] for k in report["kills"] if k["landed"]] == list(PIPELINE_STAGES), report["kills"]
    assert report["attempts"] == len(PIPELINE_STAGES) + 1
    checked = verify_outputs(reproduced)  # every manifest's stage and every sha256 it lists
    assert {"data/prepared", "models/caption_encoder", "data/embeddings", "models/vision", "reports/eval",
            "models/registration"} <= checked.keys()
    assert checked["data/prepared"] >= 2 and checked["models/vision"] >= 2 and checked["data/embeddings"] >= 2


def test_s3_remote_push_and_pull_restore_the_outputs(reproduced, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    clone = Path(shutil.copytree(reproduced, tmp_path / "repo", symlinks=True))
    dvc(["remote", "add", "-d", "store", f"s3://{bucket}/dvc"], clone)
    dvc(["remote", "modify", "store", "endpointurl", endpoint], clone)
    dvc(["remote", "modify", "store", "region", "us-east-1"], clone)
    dvc(["remote", "modify", "--local", "store", "access_key_id", "test"], clone)
    dvc(["remote", "modify", "--local", "store", "secret_access_key", "test"], clone)
    config, local = (clone / ".dvc" / "config").read_text(), (clone / ".dvc" / "config.local").read_text()
    assert "access_key_id" not in config and "secret_access_key" not in config
    assert "secret_access_key = test" in local
    assert run(["git", "check-ignore", ".dvc/config.local"], clone).strip() == ".dvc/config.local"

    before = digests(outs(clone))
    assert before
    dvc(["push"], clone)
    import boto3

    stored = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert stored.get("KeyCount", 0) >= 1

    shutil.rmtree(clone / ".dvc" / "cache")
    for out in outs(clone):
        shutil.rmtree(out)
    dvc(["pull"], clone)
    assert digests(outs(clone)) == before
    assert json.loads(dvc(["status", "--json"], clone)) == {}
