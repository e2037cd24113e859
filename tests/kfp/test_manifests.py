"""manifests/: every YAML parses, kustomization resources exist, built-in kinds validate offline."""

from pathlib import Path

import pytest
import yaml
from kfp_helpers import REPO

MANIFESTS = REPO / "manifests"
KUBERNETES_VERSION = "1.33.0"  # the oldest version the base is meant to apply to


def yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def test_there_is_a_base():
    assert MANIFESTS / "base" / "kustomization.yaml" in kustomizations()


@pytest.mark.parametrize(
    "path", sorted(MANIFESTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(MANIFESTS))
)
def test_yaml_parses_into_objects(path):
    docs = yaml_documents(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), f"{path}: apiVersion and kind are required"


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.parent.relative_to(MANIFESTS)))
def test_kustomization_resources_exist(path):
    (kustomization,) = yaml_documents(path)
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization.get("resources", [])
    assert resources
    for resource in resources:
        assert (path.parent / resource).exists(), f"{path}: missing resource {resource}"
    namespace = kustomization.get("namespace")
    for resource in resources:
        target = path.parent / resource
        for doc in yaml_documents(target) if target.is_file() else []:
            ns = doc["metadata"].get("namespace")
            assert ns in (None, namespace), f"{resource}: namespace {ns} != {namespace}"


def test_base_defines_the_namespace_and_the_pipeline_service_account():
    base = MANIFESTS / "base"
    (kustomization,) = yaml_documents(base / "kustomization.yaml")
    objects = [d for r in kustomization["resources"] for d in yaml_documents(base / r)]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in objects}
    assert ("Namespace", kustomization["namespace"]) in kinds
    assert ("ServiceAccount", "llm2clip-pipeline") in kinds


def test_builtin_kinds_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate for offline schema checks"
    )
    checked = 0
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml_documents(path):
            if doc["kind"] == "Kustomization":
                continue  # a kustomize file, not a cluster object
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
    assert checked >= 2
