"""``python -m pipelines.submit`` with the real ``kfp.Client`` against a loopback KFP API server.

The server (``fake_kfp_api.py``) speaks the v2beta1 REST API, checks every request body and
response against ``kfp_server_api``'s models and records the requests, so these tests assert
what a KFP cluster would receive: the compiled IR, the version name, the run's parameters, the
bearer token, and nothing at all when params or the profile are wrong.
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import kfp
import kubernetes
import pytest
import yaml
from fake_kfp_api import FakeKfpApi
from kfp_helpers import REPO

from llm2clip.cluster.profile import load_cluster_profile
from llm2clip.config import load_params
from pipelines import submit
from pipelines.compile import compile_pipeline
from pipelines.llm2clip_pipeline import PIPELINE_NAME, pipeline_arguments

REV = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "tok-3f9c2e71d05b"
PARAMS = REPO / "params" / "paper-openai-l14-336.yaml"
ENV = ("KFP_HOST", "KFP_TOKEN", "KFP_TOKEN_FILE", "KFP_CA_CERT", "KF_PIPELINES_ENDPOINT",
       "KF_PIPELINES_UI_ENDPOINT", "KUBECONFIG", "KUBERNETES_SERVICE_HOST")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path, caplog):
    """No kfp context file, no kube config, no KFP variables from the developer's shell."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM2CLIP_GIT_REV", REV)
    caplog.set_level(logging.DEBUG)  # everything kfp, urllib3 and submit log


def run_submit(api, *args, capsys, host=True):
    """``submit.main`` in-process; (exit code, stdout lines)."""
    rc = submit.main([*(["--host", api.url] if host else []), "--poll", "0.05", *args])
    return rc, capsys.readouterr().out.splitlines()


def expected_version(arguments):
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    return f"{REV[:12]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_submit_uploads_the_profiles_pipeline_and_runs_the_version(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    overrides = ["--set", "prepare_data.shard_size=123"]
    images = {"image": "registry.example/llm2clip:t-cpu", "gpu_image": "registry.example/llm2clip:t-cu128"}
    with FakeKfpApi(token=TOKEN) as api:
        rc, out = run_submit(api, "--params", str(PARAMS), *overrides, "--cluster", "gpu",
                             "--image", images["image"], "--gpu-image", images["gpu_image"],
                             "--pipeline-root", "s3://bucket/pipeline-root", capsys=capsys)
    assert rc == 0, errors(caplog)
    assert api.schema_errors == []

    # the pipeline: uploaded once, in the profile's namespace, with the gpu profile's compiled IR
    profile = load_cluster_profile("gpu")
    (upload,) = api.calls("POST", "/pipelines/upload")
    assert upload.query["name"] == PIPELINE_NAME and upload.query["namespace"] == profile.namespace
    ir = compile_pipeline(tmp_path / "gpu.yaml", "gpu").read_bytes()
    assert upload.files["uploadfile"] == ir
    assert "nvidia.com/gpu" in ir.decode() and "llm2clip-torch" in ir.decode()  # really the gpu profile

    # the version: git rev + params hash, same IR
    params = load_params(PARAMS, ["prepare_data.shard_size=123"])
    arguments = pipeline_arguments(params, images)
    (version,) = api.calls("POST", "/pipelines/upload_version")
    assert version.query["name"] == expected_version(arguments)
    assert version.query["pipelineid"] == next(iter(api.pipelines))
    assert version.files["uploadfile"] == ir

    # the experiment (created: it did not exist) and the run of that version
    (experiment,) = api.calls("POST", "/experiments")
    assert experiment.json["display_name"] == params.common.experiment
    assert experiment.json["namespace"] == profile.namespace
    (run,) = api.calls("POST", "/runs")
    body = run.json
    assert body["runtime_config"]["parameters"] == json.loads(json.dumps(arguments))
    assert body["runtime_config"]["parameters"]["prepare_data"]["shard_size"] == 123
    assert body["runtime_config"]["parameters"]["prepare_data"]["sources"][0]["kind"] == "webdataset"  # the file
    assert body["runtime_config"]["parameters"]["gpu_image"] == images["gpu_image"]
    assert body["runtime_config"]["pipeline_root"] == "s3://bucket/pipeline-root"
    assert body["service_account"] == profile.service_account
    assert body["experiment_id"] == next(iter(api.experiments))
    new_version = api.versions[body["pipeline_version_reference"]["pipeline_id"]][-1]
    assert body["pipeline_version_reference"]["pipeline_version_id"] == new_version["pipeline_version_id"]
    assert new_version["display_name"] == expected_version(arguments)
    assert "pipeline_spec" not in body  # the version holds the spec

    # stdout: the run URL only; auth: the token as a bearer header, and nowhere in the output
    (run_id,) = api.runs
    assert out == [f"{api.url}/#/runs/details/{run_id}"]
    assert {r.headers.get("authorization") for r in api.requests} == {f"Bearer {TOKEN}"}
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_an_existing_pipeline_gets_a_new_version_and_a_known_version_is_reused(capsys, caplog):
    with FakeKfpApi() as api:
        base = ["--params", str(PARAMS)]
        assert run_submit(api, *base, capsys=capsys)[0] == 0
        assert run_submit(api, *base, "--set", "common.seed=7", capsys=capsys)[0] == 0
        assert run_submit(api, *base, "--set", "common.seed=7", capsys=capsys)[0] == 0
    assert api.schema_errors == [], errors(caplog)
    assert len(api.calls("POST", "/pipelines/upload")) == 1, "one pipeline, never a duplicate upload"
    assert len(api.pipelines) == 1
    uploads = [r.query["name"] for r in api.calls("POST", "/pipelines/upload_version")]
    seed7 = expected_version(pipeline_arguments(load_params(PARAMS, ["common.seed=7"])))
    assert uploads == [expected_version(pipeline_arguments(load_params(PARAMS))), seed7]
    runs = [r.json["pipeline_version_reference"]["pipeline_version_id"] for r in api.calls("POST", "/runs")]
    assert len(runs) == 3 and runs[1] == runs[2] != runs[0], "the third run reuses the second's version"
    assert len(api.calls("POST", "/experiments")) == 1, "the experiment is created once, then found"


def test_a_version_name_holding_another_spec_is_not_reused(capsys, caplog):
    with FakeKfpApi() as api:
        assert run_submit(api, "--params", str(PARAMS), capsys=capsys)[0] == 0
        assert run_submit(api, "--params", str(PARAMS), "--no-cache", capsys=capsys)[0] == 0
        name = api.calls("POST", "/pipelines/upload_version")[0].query["name"]
        rc, _ = run_submit(api, "--params", str(PARAMS), "--cluster", "gpu", "--version-name", name, capsys=capsys)
    assert api.schema_errors == []
    first, second = api.calls("POST", "/pipelines/upload_version")
    assert second.query["name"].startswith(first.query["name"] + "-"), "the default name gets the spec digest"
    no_cache = yaml.safe_load_all(second.files["uploadfile"])
    tasks = next(no_cache)["root"]["dag"]["tasks"]
    assert tasks and all(t["cachingOptions"]["enableCache"] is False for t in tasks.values())
    # an explicit name that holds another spec fails before any run is created
    assert rc == 1 and len(api.calls("POST", "/runs")) == 2
    assert "another --version-name" in errors(caplog)[-1]


@pytest.mark.parametrize(("states", "rc", "final"), [(["RUNNING", "SUCCEEDED"], 0, "SUCCEEDED"),
                                                     (["RUNNING", "RUNNING", "FAILED"], 1, "FAILED")])
def test_watch_follows_the_run_to_its_end(states, rc, final, capsys, caplog):
    with FakeKfpApi(run_states=states, run_error="task train_vision failed: OOMKilled") as api:
        code, out = run_submit(api, "--params", str(PARAMS), "--watch", capsys=capsys)
    assert code == rc
    assert out[-1] == f"final state: {final}"
    assert len(api.calls("GET", "/runs/[^/]+")) == len(states)
    if rc:
        assert "OOMKilled" in errors(caplog)[-1]


def test_watch_gives_up_after_the_timeout(capsys, caplog):
    with FakeKfpApi(run_states=["RUNNING"]) as api:
        start = time.monotonic()
        rc, out = run_submit(api, "--params", str(PARAMS), "--watch", "--timeout", "2", capsys=capsys)
        took = time.monotonic() - start
    assert rc == 1 and 2 <= took < 15
    assert out[-1] == "final state: RUNNING (timed out)"
    (message,) = errors(caplog)
    assert "timed out after 2 s" in message and "RUNNING" in message


def test_recurring_creates_a_scheduled_run_with_the_cron(capsys, caplog):
    cron = "0 30 2 * * 1-5"
    with FakeKfpApi() as api:
        rc, out = run_submit(api, "--params", str(PARAMS), "--recurring", cron, capsys=capsys)
    assert rc == 0 and api.schema_errors == [], errors(caplog)
    assert api.calls("POST", "/runs") == []
    (job,) = api.calls("POST", "/recurringruns")
    assert job.json["trigger"] == {"cron_schedule": {"cron": cron}}
    assert job.json["mode"] == "ENABLE" and job.json["max_concurrency"] == 1 and job.json["no_catchup"] is True
    assert job.json["runtime_config"]["parameters"] == json.loads(json.dumps(pipeline_arguments(load_params(PARAMS))))
    (job_id,) = api.recurring_runs
    assert out == [f"{api.url}/#/recurringrun/details/{job_id}"]


def test_no_upload_sends_the_compiled_spec_with_the_run(tmp_path, capsys):
    with FakeKfpApi() as api:
        assert run_submit(api, "--params", str(PARAMS), "--no-upload", "--run-name", "r1", capsys=capsys)[0] == 0
    assert api.schema_errors == []
    assert api.calls("POST", "/pipelines/upload.*") == [] and api.calls("GET", "/pipelines") == []
    (run,) = api.calls("POST", "/runs")
    assert run.json["display_name"] == "r1"
    assert "pipeline_version_reference" not in run.json
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "cpu.yaml", "cpu").read_text()))
    assert run.json["pipeline_spec"]["pipeline_spec"]["pipelineInfo"] == docs[0]["pipelineInfo"]
    assert run.json["pipeline_spec"]["platform_spec"]["platforms"] == docs[1]["platforms"]


@pytest.mark.parametrize("case", ["bad value", "unknown key", "missing params", "unknown profile", "bad profile",
                                  "five-field cron", "token without host"])
def test_errors_before_sending_exit_2_and_send_nothing(case, tmp_path, monkeypatch, capsys, caplog):
    bad_profile = tmp_path / "bad.yaml"
    bad_profile.write_text("defaults: {cpu_request: lots}\n")
    args = {
        "bad value": ["--set", "prepare_data.shard_size=many"],
        "unknown key": ["--set", "prepare_data.no_such_key=1"],
        "missing params": ["--params", str(tmp_path / "nope.yaml")],
        "unknown profile": ["--cluster", "tpu"],
        "bad profile": ["--cluster", str(bad_profile)],
        "five-field cron": ["--recurring", "0 3 * * *"],
        "token without host": ["--kube-context", "ctx"],
    }[case]
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with FakeKfpApi() as api:
        rc, out = run_submit(api, "--params", str(PARAMS), *args, capsys=capsys, host=case != "token without host")
    assert rc == 2 and out == []
    assert api.requests == [], "nothing may be sent"
    (message,) = errors(caplog)
    assert "nothing was submitted" in message


@pytest.mark.parametrize("refusal", ["401 wrong token", "403 forbidden"])
def test_an_unauthorised_request_exits_1_with_the_auth_hint(refusal, monkeypatch, capsys, caplog):
    monkeypatch.setenv("KFP_TOKEN", "not-the-token")
    with FakeKfpApi(token="the-token" if refusal.startswith("401") else None,
                    forbid=refusal.startswith("403")) as api:
        rc, out = run_submit(api, "--params", str(PARAMS), capsys=capsys)
    assert rc == 1 and out == []
    (message,) = errors(caplog)
    assert message.startswith("not authorised (HTTP " + refusal[:3]) and "set KFP_TOKEN or --kube-context" in message
    assert api.calls("POST", "/runs") == []


def test_a_login_page_in_front_of_the_api_is_no_success(capsys, caplog):
    """Without a token, Kubeflow's auth proxy redirects to an HTML login page; kfp reads that
    as empty objects. Submit must not report a run it did not create."""
    with FakeKfpApi(login_page=True) as api:
        rc, out = run_submit(api, "--params", str(PARAMS), capsys=capsys)
    assert api.requests and any(r.path == "/dex/auth" for r in api.requests)
    assert rc == 1 and out == []
    (message,) = errors(caplog)
    assert "login page" in message and "set KFP_TOKEN or --kube-context" in message


def test_a_token_file_is_read_again_for_every_request(tmp_path, capsys, caplog):
    """A projected service-account token rotates under a long --watch."""
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")

    def rotate(request):
        if request.method == "GET" and "/runs/" in request.path:
            token_file.write_text("second-token\n")
            api.token = "second-token"

    with FakeKfpApi(token="first-token", run_states=["RUNNING", "RUNNING", "SUCCEEDED"], on_request=rotate) as api:
        rc, _ = run_submit(api, "--params", str(PARAMS), "--token-file", str(token_file), "--watch", capsys=capsys)
    assert rc == 0, errors(caplog)
    polls = [r.headers["authorization"] for r in api.calls("GET", "/runs/[^/]+")]
    assert polls == ["Bearer first-token", "Bearer second-token", "Bearer second-token"]
    assert "first-token" not in caplog.text and "second-token" not in caplog.text


def test_kube_context_reaches_kfp_through_the_kubernetes_api_proxy(tmp_path, monkeypatch, capsys, caplog):
    """No host: kfp.Client loads the context from the kube config and goes through the API
    server's service proxy to ml-pipeline in the KFP namespace, with the context's token."""
    with FakeKfpApi(token="kube-user-token") as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "other",
            "clusters": [{"name": "c", "cluster": {"server": api.url}},
                         {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "u", "user": {"token": "kube-user-token"}}],
            "contexts": [{"name": "ml", "context": {"cluster": "c", "user": "u"}},
                         {"name": "other", "context": {"cluster": "nowhere", "user": "u"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # the kubernetes package reads $KUBECONFIG once, when imported (a CLI run sets it before)
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        rc, out = run_submit(api, "--params", str(PARAMS), "--kube-context", "ml", capsys=capsys, host=False)
    assert rc == 0, errors(caplog)
    assert api.schema_errors == []
    assert {r.proxy_namespace for r in api.requests} == {"kubeflow"}, [r.path for r in api.requests]
    assert {r.headers.get("authorization") for r in api.requests} == {"Bearer kube-user-token"}
    assert api.calls("POST", "/runs") and api.experiments[next(iter(api.experiments))]["namespace"] == "llm2clip"
    assert out == [f"/#/runs/details/{next(iter(api.runs))}"]  # no UI host known
    assert "kube-user-token" not in caplog.text


def test_an_unreachable_api_exits_1_with_one_line(capsys, caplog):
    with FakeKfpApi() as api:
        url = api.url
    rc = submit.main(["--host", url, "--params", str(PARAMS)])
    assert rc == 1 and capsys.readouterr().out == ""
    (message,) = errors(caplog)
    assert message.startswith("cannot reach the KFP API")


def test_the_cli_prints_one_error_line_and_never_the_token(tmp_path):
    """The real command line, as a user sees it: stderr, no traceback, no token."""
    with FakeKfpApi(token="the-real-token") as api:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.submit", "--params", str(PARAMS)], cwd=REPO, capture_output=True,
            text=True, timeout=120,
            env={**{k: v for k, v in os.environ.items() if k not in ENV}, "KFP_HOST": api.url, "KFP_TOKEN": TOKEN,
                 "HOME": str(tmp_path)},
        )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    assert line == ("ERROR pipelines.submit: not authorised (HTTP 401 Unauthorized: Request header error: there is "
                    "no user identity header.): set KFP_TOKEN or --kube-context")


def test_help_and_option_rules():
    parser = submit.build_parser()
    text = " ".join(parser.format_help().split())
    assert "SIX fields, seconds first" in text and "--token-file" in text and "KFP_TOKEN" in text
    defaults = parser.parse_args(["--params", "p.yaml"])
    assert (defaults.cluster, defaults.pipeline_name, defaults.upload, defaults.timeout) == ("cpu", PIPELINE_NAME,
                                                                                            True, 24 * 3600)
    assert defaults.namespace is None and defaults.service_account is None  # the profile's
    for bad in (["--kube-context", "c", "--host", "http://h"], ["--watch", "--recurring", "0 0 3 * * *"]):
        with pytest.raises(SystemExit) as exit_info:
            submit.main(["--params", str(PARAMS), *bad])
        assert exit_info.value.code == 2
