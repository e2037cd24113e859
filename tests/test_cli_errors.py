"""User errors through the real CLI: one ERROR line that says what to do, exit 2, no traceback.

Each case runs ``python -m llm2clip`` in a subprocess (the way a user meets it). S3 cases talk to
a moto server on 127.0.0.1; "unreachable" is an unused 127.0.0.1 port; "no credentials" is an
environment without any AWS variable or config file (and no instance-metadata probe).
``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llm2clip.cli import ErrorContext, explain_error
from llm2clip.io import StageError
from llm2clip.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMON = {"tracking": False}
SYNTHETIC = {"sources": [{"kind": "synthetic", "name": "s", "count": 8, "image_size": 32}]}
BOTH = {"short": "txt", "dense": "txt"}


def cli(*args: str, env: dict[str, str] | None = None, drop_aws: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m llm2clip ARGS``; ``drop_aws`` removes every AWS_* variable first."""
    base = {k: v for k, v in os.environ.items() if not (drop_aws and k.startswith("AWS_"))}
    return subprocess.run([sys.executable, "-m", "llm2clip", *args], capture_output=True, text=True,
                          cwd=REPO, env={**base, **(env or {})}, timeout=300)


def prepare(config: dict, data: str, endpoint: str = "", **kw) -> subprocess.CompletedProcess:
    common = {**COMMON, "s3_endpoint_url": endpoint}
    return cli("prepare_data", "--common-json", json.dumps(common), "--config-json", json.dumps(config),
               "--data", data, **kw)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Assert exit ``code``, exactly one ERROR line (containing ``needles``) and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-4000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def no_credentials(tmp_path) -> dict[str, str]:
    """Environment additions under which botocore finds no credentials and probes nothing."""
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    return {"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------------------- local and config


def test_params_path_that_is_a_directory(tmp_path):
    line = one_error_line(cli("prepare_data", "--params", str(tmp_path), "--data", str(tmp_path / "out")),
                          str(tmp_path), "is a directory")
    assert "prepare_data" in line


def test_missing_manifest_file(tmp_path):
    config = {"sources": [{"kind": "manifest", "path": str(tmp_path / "nope.csv"),
                           "caption_columns": {"short": "c", "dense": "d"}}]}
    one_error_line(prepare(config, str(tmp_path / "out")), "nope.csv")


def test_bad_json_flag(tmp_path):
    one_error_line(cli("prepare_data", "--common-json", "{tracking: false", "--data", str(tmp_path)),
                   "--common-json", "not valid JSON")


def test_unknown_config_key(tmp_path):
    one_error_line(cli("prepare_data", "--params", str(REPO / "params.yaml"), "--set",
                       "prepare_data.shard_sise=3", "--data", str(tmp_path / "out")),
                   "unknown key prepare_data.shard_sise")


def test_output_where_this_user_may_not_write(tmp_path):
    if os.geteuid() == 0:  # root ignores file modes; sysfs refuses mkdir even to root
        target = Path("/sys/llm2clip-test-output")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    try:
        target.mkdir()
    except PermissionError:
        pass
    else:
        pytest.skip(f"{target} is writable here")
    one_error_line(prepare(SYNTHETIC, str(target)), "permission denied", str(target))


# ---------------------------------------------------------------------------------------- S3


def s3_cases(bucket: str) -> dict[str, tuple[dict, str]]:
    """(prepare_data config, --data) that touch S3: as a webdataset source, a manifest, an output."""
    return {
        "webdataset": ({"sources": [{"kind": "webdataset", "urls": f"s3://{bucket}/x-{{000..001}}.tar",
                                     "caption_fields": BOTH}]}, None),
        "manifest": ({"sources": [{"kind": "manifest", "path": f"s3://{bucket}/m.csv",
                                   "caption_columns": {"short": "c", "dense": "d"}}]}, None),
        "output": (SYNTHETIC, f"s3://{bucket}/prepared"),
    }


@pytest.mark.parametrize("where", ["webdataset", "manifest", "output"])
def test_s3_without_credentials(s3_bucket, no_credentials, tmp_path, where):
    endpoint, bucket = s3_bucket
    config, data = s3_cases(bucket)[where]
    proc = prepare(config, data or str(tmp_path / "out"), endpoint, env=no_credentials, drop_aws=True)
    one_error_line(proc, "no usable S3 credentials", "AWS_ACCESS_KEY_ID", endpoint)


@pytest.mark.parametrize("where", ["webdataset", "output"])
def test_s3_endpoint_unreachable(tmp_path, where):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config, data = s3_cases("bucket")[where]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}  # no retries: 1 s, not 10
    one_error_line(prepare(config, data or str(tmp_path / "out"), endpoint, env=env),
                   "cannot reach the S3 endpoint", "common.s3_endpoint_url", endpoint)


def test_s3_output_bucket_that_does_not_exist(s3_server):
    one_error_line(prepare(SYNTHETIC, "s3://no-such-bucket-here/prepared", s3_server),
                   "bucket does not exist")


@pytest.fixture(scope="module")
def s3_with_iam(tmp_path_factory):
    """A moto server that checks credentials; yields ``(endpoint, bucket, key id, secret)``.

    The key belongs to a user without any policy, so every S3 call it signs is denied.
    """
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto_iam") / "moto.log", "w")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # the three set-up calls below
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
                 "region_name": "us-east-1"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="locked-bucket")
        yield endpoint, "locked-bucket", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_s3_access_denied(s3_with_iam):
    endpoint, bucket, key_id, secret = s3_with_iam
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    one_error_line(prepare(SYNTHETIC, f"s3://{bucket}/prepared", endpoint, env=env),
                   "S3 refused access", "403", endpoint)


# ------------------------------------------------------------------------------------- --debug


@pytest.mark.parametrize("before", [True, False], ids=["before-stage", "after-stage"])
def test_debug_shows_the_traceback(tmp_path, before):
    args = ["prepare_data", "--params", str(tmp_path), "--data", str(tmp_path / "out")]
    proc = cli(*(["--debug", *args] if before else [*args, "--debug"]))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" in output and "IsADirectoryError" in output
    assert len([line for line in output.splitlines() if " ERROR " in line]) == 1


# ------------------------------------------------------------------------- the table, in process


def _raised(outer: BaseException, inner: BaseException, cause: bool = True) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            if cause:
                raise outer from err
            raise outer  # noqa: B904 (context, as aiobotocore raises)
    except BaseException as err:
        return err


def test_wrapped_botocore_errors_are_unwrapped():
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")
    message, code = explain_error(_raised(PermissionError("Forbidden"), denied), ErrorContext("evaluate"))
    assert code == 2 and message.startswith("evaluate: S3 refused access (403 on HeadObject)")
    missing = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "PutObject")
    message, _ = explain_error(_raised(FileNotFoundError("gone"), missing, cause=False), ErrorContext("x"))
    assert "bucket does not exist" in message


def test_stage_error_wins_over_its_cause_and_is_one_line():
    err = _raised(StageError("data changed:\n re-run prepare_data"), OSError(errno.EIO, "io"))
    assert explain_error(err, ErrorContext("embed_captions")) == (
        "embed_captions failed: data changed: re-run prepare_data", 2)


def test_a_bug_raised_while_handling_a_user_error_keeps_its_traceback(monkeypatch, tmp_path):
    import llm2clip.cli as cli_module

    bug = _raised(KeyError("oops"), FileNotFoundError(errno.ENOENT, "gone", "x"), cause=False)
    assert explain_error(bug, ErrorContext("x")) is None

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(cli_module, "launch", broken)
    with pytest.raises(KeyError):
        cli_module.main(["prepare_data", "--common-json", json.dumps(COMMON), "--config-json",
                         json.dumps(SYNTHETIC), "--data", str(tmp_path)])


def test_torchrun_failure_stays_exit_1():
    err = subprocess.CalledProcessError(3, [sys.executable, "-m", "torch.distributed.run", "-m", "llm2clip"])
    message, code = explain_error(err, ErrorContext("train_vision"))
    assert code == 1 and message.startswith("train_vision failed: torchrun exited with 3")
