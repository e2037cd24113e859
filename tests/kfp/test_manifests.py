"""manifests/: every kustomization renders, every object validates strictly, and the cluster policies hold.

Rendered with ``kubectl kustomize`` (once per target and session). Built-in kinds are checked with
``kubernetes-validate`` in strict mode, Kubeflow Trainer kinds with ``llm2clip.cluster.crds``
(strict: unknown fields refused, CEL minimums checked). No cluster is involved.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kfp_helpers import REPO

from llm2clip.cluster import crds

MANIFESTS = REPO / "manifests"
TEMPLATES = MANIFESTS / "secrets-templates"
TARGETS = ("base", "overlays/local", "overlays/gpu")
KUBERNETES_VERSION = "1.33.0"  # the oldest version the manifests are meant to apply to
NAMESPACE = "llm2clip"
SERVICE_ACCOUNT = "llm2clip-pipeline"
RUNTIME = "llm2clip-torch"
KUBECTL = shutil.which("kubectl")

# What the Roles may grant, and nothing more: (apiGroup, resource) -> verbs.
RBAC_ALLOWED = {
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "watch", "delete", "list"},
    ("", "pods"): {"get", "list"},
    ("", "pods/log"): {"get", "list"},
    ("", "events"): {"list"},
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},  # the KFP (Argo) executor of each task
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterTrainingRuntime", "PersistentVolume"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def yaml_documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    """Files the kustomizations use as patches (JSON patches are lists, not objects)."""
    out = set()
    for path in kustomizations():
        for patch in yaml_documents(path)[0].get("patches", []):
            if "path" in patch:
                out.add((path.parent / patch["path"]).resolve())
    return out


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    """``kubectl kustomize manifests/<target>`` as objects (cached: one render per session)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations (install kubectl to run this)")
    done = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


@pytest.fixture(scope="session", params=TARGETS)
def rendered(request) -> tuple[dict, ...]:
    return render(request.param)


def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def node_job(objects) -> dict:
    """The replicated job ``node`` of the llm2clip-torch runtime (a JobSet ReplicatedJob)."""
    (runtime,) = find(objects, "TrainingRuntime", RUNTIME)
    (job,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    return job


def runtime_pod(objects) -> dict:
    """The pod spec of the runtime's node job."""
    return node_job(objects)["template"]["spec"]["template"]["spec"]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod an object would create."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in POD_TEMPLATE_KINDS:
        yield where, obj["spec"]["template"]["spec"]
    elif obj["kind"] == "CronJob":
        yield where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield where, obj["spec"]
    elif obj["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
        for job in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            yield f"{where}/{job['name']}", job["template"]["spec"]["template"]["spec"]


def containers(objects) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every container and initContainer."""
    for obj in objects:
        for where, pod in pod_specs(obj):
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                yield f"{where}/{container['name']}", pod, container


def secret_refs(objects) -> Iterator[tuple[str, str]]:
    """(secret, key) of every secretKeyRef in the rendered objects."""
    for _, _, container in containers(objects):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"]


def secret_templates() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path in sorted(TEMPLATES.glob("*.yaml")) for doc in yaml_documents(path)}


# --- files ---------------------------------------------------------------------------------------


def test_there_is_a_base_and_both_overlays():
    assert {str(p.parent.relative_to(MANIFESTS)) for p in kustomizations()} == set(TARGETS)


@pytest.mark.parametrize("path", sorted(MANIFESTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_yaml_parses_into_objects(path):
    docs = yaml_documents(path)
    assert docs, f"{path} is empty"
    if path.resolve() in patch_files() and isinstance(docs[0], list):  # a JSON patch
        assert all({"op", "path"} <= set(op) for op in docs[0]), path
        return
    for doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), f"{path}: apiVersion and kind are required"


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.parent.relative_to(MANIFESTS)))
def test_kustomization_resources_exist_and_skip_the_secret_templates(path):
    (kustomization,) = yaml_documents(path)
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == NAMESPACE
    for resource in kustomization["resources"]:
        target = (path.parent / resource).resolve()
        assert target.exists(), f"{path}: missing resource {resource}"
        assert TEMPLATES not in (target, *target.parents), f"{path}: applies {resource}, a template without values"


# --- rendering and schemas -----------------------------------------------------------------------


def test_every_target_renders(rendered):
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "TrainingRuntime", "Deployment"} <= kinds


def test_builtin_kinds_validate_strictly(rendered):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate for offline schema checks"
    )
    builtin = [o for o in rendered if o["kind"] not in crds.KINDS]
    for obj in builtin:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert len(builtin) >= 7


def test_trainer_kinds_validate_strictly(rendered):
    trainer = [o for o in rendered if o["kind"] in crds.KINDS]
    for obj in trainer:
        crds.validate(obj)
    assert [o["metadata"]["name"] for o in trainer] == [RUNTIME]


def test_secret_templates_validate_and_hold_no_values():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    templates = secret_templates()
    assert set(templates) == {"llm2clip-s3", "llm2clip-mlflow", "llm2clip-mlflow-db", "llm2clip-mlflow-auth"}
    for name, secret in templates.items():
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
        assert secret["metadata"]["namespace"] == NAMESPACE
        assert "data" not in secret, name
        assert all(value == "" for value in secret["stringData"].values()), f"{name} holds a value"


# --- policies over the rendered output ----------------------------------------------------------


def test_every_container_is_hardened_and_requests_resources(rendered):
    checked = 0
    for where, pod, container in containers(rendered):
        pod_ctx, ctx = pod.get("securityContext", {}), container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0, f"{where}: runs as root"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
        assert "add" not in ctx.get("capabilities", {}) and not ctx.get("privileged"), where
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{where}: cpu and memory requests"
        checked += 1
    assert checked >= 2


def test_every_image_is_pinned(rendered):
    for where, _, container in containers(rendered):
        image = container["image"]
        last = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or ":" in last, f"{where}: {image} has no tag"
        assert not image.endswith(":latest"), f"{where}: {image} is :latest"


def test_rendered_secrets_hold_no_values(rendered):
    for secret in find(rendered, "Secret"):
        values = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert all(value in ("", None) for value in values.values()), secret["metadata"]["name"]
        assert secret["metadata"]["name"] not in secret_templates(), "a template would overwrite the real Secret"


def test_every_secret_reference_is_documented_by_a_template(rendered):
    templates = secret_templates()
    for name, key in secret_refs(rendered):
        assert name in templates, f"secret {name} has no template in {TEMPLATES}"
        assert key in templates[name]["stringData"], f"secret {name}: key {key} is not in its template"


def test_everything_is_namespaced_in_llm2clip(rendered):
    cluster_scoped = [o for o in rendered if o["kind"] in CLUSTER_SCOPED]
    assert [(o["kind"], o["metadata"]["name"]) for o in cluster_scoped] == [("Namespace", NAMESPACE)]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


def test_roles_grant_only_the_allow_list(rendered):
    for role in find(rendered, "Role"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    allowed = RBAC_ALLOWED.get((group, resource))
                    assert allowed is not None, f"{role['metadata']['name']}: {group}/{resource} is not allowed"
                    assert set(rule["verbs"]) <= allowed, f"{group}/{resource}: {rule['verbs']} > {allowed}"
    launcher = [r for role in find(rendered, "Role") for r in role["rules"] if "trainjobs" in r["resources"]]
    assert {v for r in launcher for v in r["verbs"]} >= {"create", "get", "watch", "delete"}


def test_the_pipeline_service_account_is_bound_to_every_role(rendered):
    assert find(rendered, "ServiceAccount", SERVICE_ACCOUNT)
    roles = {r["metadata"]["name"] for r in find(rendered, "Role")}
    bound = set()
    for binding in find(rendered, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role", "no ClusterRole, even through a RoleBinding"
        subject = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
        assert binding["subjects"] == [subject]
        bound.add(binding["roleRef"]["name"])
    assert bound == roles


def test_the_runtime_has_shared_memory_tmp_and_the_trainer_labels(rendered):
    (runtime,) = find(rendered, "TrainingRuntime", RUNTIME)
    assert "torch" in runtime["spec"]["mlPolicy"]
    labels = node_job(rendered)["template"]["metadata"]["labels"]
    assert labels["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = runtime_pod(rendered)
    (node,) = [c for c in pod["containers"] if c["name"] == "node"]
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e for e in node["env"]}
    assert env["HOME"]["value"] == "/tmp" and env["TORCH_EXTENSIONS_DIR"]["value"].startswith("/tmp/")
    assert not [e for e in node["env"] if "valueFrom" in e], "secrets come with the TrainJob, not the runtime"
    trainjob = pytest.importorskip("llm2clip.cluster.trainjob")
    assert mounts["/dev/shm"] == trainjob.SHM_VOLUME, "the launcher's runtimePatch resizes this volume by name"


def test_the_mlflow_server(rendered):
    (deployment,) = find(rendered, "Deployment", "llm2clip-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    pin = re.search(r'"mlflow==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{pin}-full"
    args = " ".join(container["args"])  # the start script (run for real in test_mlflow_auth.py)
    assert '--backend-store-uri="$MLFLOW_BACKEND_STORE_URI"' in args and "--serve-artifacts" in args
    assert "--app-name basic-auth" in args
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    assert values["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"] == {"name": "llm2clip-mlflow-db", "key": "MLFLOW_BACKEND_STORE_URI"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": "llm2clip-mlflow-auth", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == {"name": "llm2clip-s3", "key": "AWS_ENDPOINT_URL"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]
    (service,) = find(rendered, "Service", "llm2clip-mlflow")
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]


# --- per overlay ---------------------------------------------------------------------------------


def test_the_local_overlay_runs_minio_and_postgres_on_cpu():
    objects = render("overlays/local")
    assert find(objects, "Deployment", "llm2clip-minio") and find(objects, "Service", "llm2clip-minio")
    assert find(objects, "PersistentVolumeClaim", "llm2clip-minio")
    assert find(objects, "StatefulSet", "llm2clip-postgres") and find(objects, "Service", "llm2clip-postgres")
    node = runtime_pod(objects)["containers"][0]
    assert node["image"].endswith("-cpu") and "nvidia.com/gpu" not in str(node["resources"])


def test_the_gpu_overlay_puts_the_runtime_on_gpu_nodes():
    objects = render("overlays/gpu")
    pod = runtime_pod(objects)
    node = pod["containers"][0]
    assert node["image"].endswith("-cu128")
    assert int(node["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (quota,) = find(objects, "ResourceQuota")
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= int(node["resources"]["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize("profile", sorted((REPO / "params" / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_cluster_profiles_name_what_the_manifests_create(profile):
    settings = yaml.safe_load(profile.read_text())
    objects = render("base")
    assert settings["namespace"] == NAMESPACE
    assert find(objects, "ServiceAccount", settings["service_account"])
    assert find(objects, "TrainingRuntime", settings["trainjob_runtime"])
    templates = secret_templates()
    for entry in settings["secrets"]:
        assert entry["secret"] in templates, entry["secret"]
        assert set(entry["env"].values()) <= set(templates[entry["secret"]]["stringData"]), entry


def test_the_mlflow_server_retries_s3_as_the_stages_do():
    """The server uploads the registry's artifacts (``--artifacts-destination``): its botocore gets
    the stages' retry settings (tests/test_registration_faults.py drills them)."""
    from llm2clip.io import s3_retry_env

    server = [c for _, _, c in containers(render("base")) if c["name"] == "mlflow"]
    assert server, "no mlflow container in manifests/base"
    env = {e["name"]: e.get("value") for e in server[0].get("env", [])}
    assert {k: env.get(k) for k in s3_retry_env()} == s3_retry_env()
