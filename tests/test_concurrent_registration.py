"""Concurrent registration against a real MLflow server on PostgreSQL (a cluster this test makes
with the system's initdb, tests/postgres.py): two register processes at once end with exactly one
champion, the better one, and every version keeps all its tags; the same when a challenger
arrives while another registration is promoting. The registry lock (``llm2clip.registry.
registry_lock``) is what makes the read-decide-move of the aliases one step."""

import json
import subprocess
import sys

import pytest
import torch
from postgres import available, postgres_cluster
from services import free_port, start_mlflow_server, stop

from llm2clip.registry import CHAMPION, DECISION_TAG, FINGERPRINT_TAG, LOCK_SUFFIX, registry_lock
from llm2clip.vision.model import LLM2CLIPModel

TOWER = {"kind": "vit_scratch", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "patch_size": 8, "image_size": 16}}
NAME = "llm2clip-concurrent"
REGISTER = """
import json, sys
from llm2clip.registry import register_model
result = register_model(sys.argv[1], None, {"score": float(sys.argv[2])}, name=sys.argv[3], primary_metric="score",
                        tracking_uri=sys.argv[4], experiment="concurrent")
print(json.dumps(result.to_dict()))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert available(), "PostgreSQL's initdb/pg_ctl are missing: apt-get install postgresql (.ci/system-packages.sh)"
    with postgres_cluster(free_port()) as url:
        proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-pg"), backend=url)
        try:
            yield uri
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = LLM2CLIPModel.build(TOWER, llm_dim=16, embed_dim=8, adapter_blocks=1)
        out.append(model.save_pretrained(tmp_path_factory.mktemp(f"model{seed}")))
    return out


def register_at_once(uri: str, runs: list[tuple[str, float]]) -> list[dict]:
    """Start one register process per ``(model dir, score)`` together; their results."""
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(model), str(score), NAME, uri],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for model, score in runs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_registrations_at_once_leave_one_champion_the_better(server, models):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    first = register_at_once(server, [(models[0], 0.5), (models[1], 0.7)])
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == first[1]["version"]
    # a challenger arrives while another registration promotes: the best of the three wins
    second = register_at_once(server, [(models[2], 0.9), (models[3], 0.6)])
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == second[0]["version"]
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 4
    for v in versions:  # nothing lost: every version has its decision, its metric and its fingerprint
        full = client.get_model_version(NAME, v.version)
        assert {DECISION_TAG, "promotion_reason", "champion_before", "metric.score", FINGERPRINT_TAG} <= set(full.tags)
    assert sum(CHAMPION in client.get_model_version(NAME, v.version).aliases for v in versions) == 1
    assert not client.search_registered_models(f"name = '{NAME}{LOCK_SUFFIX}'")  # the lock was released


def test_the_lock_is_exclusive_and_a_stale_one_is_broken(server, caplog):
    from mlflow.tracking import MlflowClient

    from llm2clip.registry import RegistrationError

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    with registry_lock(client, "lock-probe"):
        with pytest.raises(RegistrationError, match="its alias lock lock-probe.lock is held by"):
            with registry_lock(client, "lock-probe", wait_s=1.0, poll_s=0.2):
                pass
        with registry_lock(client, "lock-probe", stale_s=0.0):  # as if the holder had died long ago
            assert "stale, broken" in caplog.text
    assert "was broken by another registration while held" in caplog.text  # the outer release says so
    assert not client.search_registered_models("name = 'lock-probe.lock'")


def test_a_registered_model_holds_no_pickled_python(server, tmp_path):
    """Models from code: MLflow stores the model's script, the weights are safetensors; no file of
    the registered artifact is a pickle (protocol 2+ starts with 0x80) or a .pkl."""
    import mlflow
    import yaml

    mlflow.set_tracking_uri(server)  # version 1: registered by the first test
    folder = tmp_path / "model"
    mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(folder))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    pickled = [p for p in files if p.suffix in (".pkl", ".pickle") or p.read_bytes()[:1] == b"\x80"]
    assert not pickled, pickled
    flavor = yaml.safe_load(next(folder.rglob("MLmodel")).read_text())["flavors"]["python_function"]
    # loaded by MLflow's code-model loader from the stored script, not unpickled (python_model.pkl)
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert flavor["model_code_path"].endswith("vision_model.py")
