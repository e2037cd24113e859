"""The MLflow server of manifests/base refuses anonymous registry writes.

The Deployment's own start script and its ConfigMap's ``auth.ini`` (rendered with ``kubectl
kustomize``) run here for real: ``sh -c <the script>`` with the container's environment, sqlite
files in place of PostgreSQL (backend and auth databases), moto S3 for the artifacts. A client
without credentials then tries to create a registered model, move an alias of an existing one and
create an experiment: each is refused (401) under the shipped configuration, and each goes through
when the same script runs with authentication switched off (``--app-name basic-auth`` removed),
so the check tells the two apart. The admin and a user the admin makes can write.
"""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from services import free_port, stop, wait_http
from test_manifests import find, render

BIN = Path(sys.executable).parent


def shipped():
    """``(start script, container env, auth.ini)`` of the rendered base."""
    objects = render("base")
    (config,) = find(objects, "ConfigMap", "llm2clip-mlflow-auth")
    (deployment,) = find(objects, "Deployment", "llm2clip-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    return container["args"][0], container["env"], config["data"]["auth.ini"]


def start(tmp: Path, s3_bucket, auth: bool = True):
    """Run the shipped start script locally; returns ``(process, uri, admin credentials)``."""
    script, env_spec, ini = shipped()
    if not auth:
        assert "--app-name basic-auth" in script
        script = script.replace("--app-name basic-auth ", "")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "auth.ini.template").write_text(ini)
    endpoint, bucket = s3_bucket
    admin = ("admin", secrets.token_urlsafe(16))
    values = {e["name"]: e.get("value") for e in env_spec}  # the manifest's plain values...
    values.update(  # ...and, for what comes from Secrets or names cluster paths, local stand-ins
        MLFLOW_PORT=str(free_port()), MLFLOW_ARTIFACTS_DESTINATION=f"s3://{bucket}/mlflow-artifacts",
        MLFLOW_AUTH_TEMPLATE=str(tmp / "auth.ini.template"), MLFLOW_AUTH_CONFIG_PATH=str(tmp / "auth.ini"),
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp / 'auth.db'}",
        MLFLOW_AUTH_ADMIN_USERNAME=admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32), MLFLOW_S3_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],  # the moto session's
        AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"], HOME=str(tmp))
    assert set(values) >= {e["name"] for e in env_spec} and None not in values.values()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **values,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=log, stderr=log)
    uri = f"http://127.0.0.1:{values['MLFLOW_PORT']}"
    wait_http(f"{uri}/health", 120, proc)
    return proc, uri, admin


def attempts(uri: str, auth: tuple[str, str] | None) -> dict[str, int]:
    """HTTP status of each registry write (MLflow's REST API, as any client sends it)."""
    api = f"{uri}/api/2.0/mlflow"

    def post(path: str, body: dict) -> int:
        return requests.post(f"{api}/{path}", json=body, auth=auth, timeout=30).status_code

    suffix = secrets.token_hex(3)
    return {
        "create a registered model": post("registered-models/create", {"name": f"anon-{suffix}"}),
        "move champion": post("registered-models/alias", {"name": "guarded", "alias": "champion", "version": "1"}),
        "create an experiment": post("experiments/create", {"name": f"anon-{suffix}"}),
    }


def guarded_model(uri: str, admin: tuple[str, str]) -> None:
    """Registered model ``guarded`` with version 1, made by the admin."""
    api = f"{uri}/api/2.0/mlflow"
    assert requests.post(f"{api}/registered-models/create", json={"name": "guarded"}, auth=admin,
                         timeout=30).status_code == 200
    made = requests.post(f"{api}/model-versions/create", auth=admin, timeout=30,
                         json={"name": "guarded", "source": "s3://llm2clip-mlflow/models/guarded"})
    assert made.status_code == 200, made.text


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket of its own on the session's moto server."""
    import boto3

    name = f"auth-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory, bucket):
    proc, uri, admin = start(tmp_path_factory.mktemp("mlflow-auth"), bucket)
    try:
        guarded_model(uri, admin)
        yield uri, admin
    finally:
        stop(proc)


def test_the_shipped_server_refuses_an_unauthenticated_client(shipped_server):
    uri, admin = shipped_server
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # the probes' endpoint stays open
    writes = ["create a registered model", "move champion", "create an experiment"]
    assert attempts(uri, None) == dict.fromkeys(writes, 401)
    assert attempts(uri, ("admin", "not-the-password")) == dict.fromkeys(writes, 401)


def test_the_admin_and_a_user_it_makes_can_write(shipped_server):
    uri, admin = shipped_server
    assert set(attempts(uri, admin).values()) == {200}
    user = ("llm2clip-pipeline", secrets.token_urlsafe(16))
    made = requests.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": user[0], "password": user[1]},
                         auth=admin, timeout=30)
    assert made.status_code == 200, made.text
    outcome = attempts(uri, user)
    assert outcome["create a registered model"] == outcome["create an experiment"] == 200
    assert outcome["move champion"] == 403  # authenticated, but not allowed on the admin's model (READ)


def test_with_authentication_off_the_same_client_gets_through(tmp_path, bucket):
    """The check above detects the difference: the same start script without the auth app."""
    proc, uri, admin = start(tmp_path, bucket, auth=False)
    try:
        guarded_model(uri, admin)
        assert set(attempts(uri, None).values()) == {200}
    finally:
        stop(proc)
