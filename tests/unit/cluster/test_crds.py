"""llm2clip.cluster.crds: strict validation of Kubeflow Trainer objects against the vendored CRD schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from llm2clip.cluster import crds
from llm2clip.cluster.crds import KINDS, CRDValidationError, validate, validate_file

DATA = Path(__file__).parent / "data"
EXAMPLE_RUNTIME = DATA / "example-runtime-torch-distributed.yaml"
UPSTREAM = Path(__file__).resolve().parents[4] / "shared" / "k8s-schemas"  # ../shared beside the repo
API = "trainer.kubeflow.org/v1alpha1"


def example_runtime() -> dict:
    return next(doc for doc in yaml.safe_load_all(EXAMPLE_RUNTIME.read_text()) if doc)


def trainjob(**trainer) -> dict:
    """A TrainJob like the launcher builds: explicit torchrun, nodes, GPUs, env from a secret."""
    return {
        "apiVersion": API,
        "kind": "TrainJob",
        "metadata": {"name": "llm2clip-train-vision-0a1b2c3d", "namespace": "llm2clip", "labels": {"app": "x"}},
        "spec": {
            "runtimeRef": {"name": "llm2clip-torch", "kind": "TrainingRuntime"},
            "trainer": {
                "image": "ghcr.io/llm2clip/llm2clip:0.1.0-cu128",
                "command": ["torchrun", "-m", "llm2clip", "train_vision"],
                "args": ["--data", "s3://bucket/data"],
                "numNodes": 2,
                "numProcPerNode": 8,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": 8, "cpu": "32", "memory": "200Gi"}},
                "env": [
                    {"name": "AWS_ACCESS_KEY_ID",
                     "valueFrom": {"secretKeyRef": {"name": "llm2clip-s3", "key": "AWS_ACCESS_KEY_ID"}}},
                ],
                **trainer,
            },
        },
    }  # fmt: skip


def problems_of(obj: dict) -> list[str]:
    with pytest.raises(CRDValidationError) as caught:
        validate(obj)
    assert str(caught.value).splitlines()[1:] == caught.value.problems  # one problem per line
    return caught.value.problems


def test_the_upstream_example_runtime_validates():
    validate(example_runtime())
    assert validate_file(EXAMPLE_RUNTIME)[0]["metadata"]["name"] == "torch-distributed"


def test_the_example_as_a_namespaced_training_runtime_validates():
    runtime = example_runtime() | {"kind": "TrainingRuntime"}
    runtime["metadata"] = {**runtime["metadata"], "namespace": "llm2clip"}
    validate(runtime)


def test_a_trainjob_validates():
    validate(trainjob())


def test_a_typo_is_an_unknown_field_with_a_suggestion():
    obj = trainjob(numNode=2)
    assert problems_of(obj) == [
        "spec.trainer.numNode: unknown field (the API server would prune it; did you mean 'numNodes'?)"
    ]


def test_zero_nodes_is_refused():
    assert problems_of(trainjob(numNodes=0)) == ["spec.trainer.numNodes: 0 is less than the minimum of 1"]


def test_nodes_must_be_an_integer():
    (problem,) = problems_of(trainjob(numNodes="auto"))
    assert problem.startswith("spec.trainer.numNodes: 'auto' is not of type 'integer'")


def test_a_wrong_api_version_is_refused():
    obj = trainjob() | {"apiVersion": "kubeflow.org/v1"}
    assert problems_of(obj) == [
        "apiVersion: 'kubeflow.org/v1' is not served for TrainJob; expected 'trainer.kubeflow.org/v1alpha1'"
    ]


def test_an_unknown_kind_names_the_known_ones():
    (problem,) = problems_of(trainjob() | {"kind": "PyTorchJob"})
    assert "PyTorchJob" in problem
    assert all(kind in problem for kind in KINDS)


def test_every_problem_is_listed_with_its_path():
    obj = trainjob(numNode=2, numProcPerNode=0, numNodes="x")
    obj["metadata"]["name"] = "Bad_Name"
    lines = problems_of(obj)
    assert len(lines) == 5
    for prefix in ("metadata.name:", "spec.trainer.numNode:", "spec.trainer.numNodes:", "spec.trainer.numProcPerNode:"):
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["spec"]["trainer"].update(numProcPerNode=0), "spec.trainer.numProcPerNode: numProcPerNode must"),
        (lambda o: o["spec"].update(managedBy="me"), "spec.managedBy: ManagedBy must be"),
        (lambda o: o["metadata"].update(name="a.b"), "metadata.name: metadata.name must match RFC 1035"),
        (lambda o: o["metadata"].update(name="a" * 64), "metadata.name: metadata.name must be no more than 63"),
        (
            lambda o: o["spec"].update(initializer={"dataset": {"storageUri": "bucket/data"}}),
            "spec.initializer.dataset.storageUri: storageUri may be empty, or it must be a valid URI",
        ),
        (
            lambda o: o["spec"]["trainer"]["env"].append({"name": "AWS_ACCESS_KEY_ID", "value": "x"}),
            "spec.trainer.env[1]: duplicate entry (name='AWS_ACCESS_KEY_ID')",
        ),
        (
            lambda o: o.update(status={"trainerStatus": {"progressPercentage": 3}}),
            "status.trainerStatus: lastUpdatedTime is required",
        ),
    ],
    ids=["numProcPerNode", "managedBy", "name-dots", "name-length", "storageUri", "duplicate-env", "trainerStatus"],
)
def test_static_cel_rules_of_the_trainjob(mutate, expected):
    obj = trainjob()
    mutate(obj)
    assert any(line.startswith(expected) for line in problems_of(obj)), expected


def test_static_cel_rules_of_the_runtime():
    runtime = example_runtime()
    runtime["spec"]["mlPolicy"]["mpi"] = {"numProcPerNode": 0}
    runtime["spec"]["mlPolicy"]["torch"] = {"envInjection": {"targets": [{"containerNames": ["node"]}]}}
    lines = problems_of(runtime)
    assert any(line.startswith("spec.mlPolicy: Only one of the policy") for line in lines)
    assert any(line.startswith("spec.mlPolicy.mpi.numProcPerNode: NumProcPerNode in mpiPolicy") for line in lines)
    assert any("containerNames must not include the main node container" in line for line in lines)


def test_runtime_nodes_must_be_at_least_one():
    runtime = example_runtime()
    runtime["spec"]["mlPolicy"]["numNodes"] = 0
    assert problems_of(runtime) == ["spec.mlPolicy.numNodes: 0 is less than the minimum of 1"]


def test_an_empty_object_schema_refuses_fields():
    runtime = example_runtime()
    runtime["spec"]["mlPolicy"] = {"numNodes": 1, "jax": {"coordinator": "x"}}
    assert problems_of(runtime) == ["spec.mlPolicy.jax.coordinator: unknown field (the API server would prune it)"]


def test_int_or_string_quantities():
    validate(trainjob(resourcesPerNode={"requests": {"cpu": "500m", "memory": 1024}}))
    (problem,) = problems_of(trainjob(resourcesPerNode={"limits": {"nvidia.com/gpu": ["1"]}}))
    assert problem.startswith("spec.trainer.resourcesPerNode.limits['nvidia.com/gpu']: ['1'] is not valid")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"namespace": "llm2clip"}, "metadata.name: required"),
        ({"name": "x", "namespace": "Bad_NS"}, "metadata.namespace: 'Bad_NS' is not a DNS-1123 label"),
        ({"name": "x", "labels": {"a/b/c": "v"}}, "metadata.labels['a/b/c']: invalid key"),
        ({"name": "x", "labels": {"k": "bad value"}}, "metadata.labels.k: invalid label value"),
        ({"name": "x", "annotations": {"k": 3}}, "metadata.annotations.k: value must be a string"),
        ({"name": "x", "nmae": "y"}, "metadata.nmae: unknown field"),
    ],
)
def test_metadata_rules(metadata, expected):
    obj = trainjob()
    obj["metadata"] = metadata
    assert any(line.startswith(expected) for line in problems_of(obj)), expected


def test_a_cluster_scoped_runtime_has_no_namespace():
    runtime = example_runtime()
    runtime["metadata"]["namespace"] = "llm2clip"
    assert problems_of(runtime) == ["metadata.namespace: must not be set on a cluster-scoped kind"]


def test_validate_file_reports_each_document(tmp_path):
    bad = trainjob(numNodes=0)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all([trainjob(), bad]))
    with pytest.raises(CRDValidationError) as caught:
        validate_file(path)
    assert caught.value.problems == ["[doc 1] spec.trainer.numNodes: 0 is less than the minimum of 1"]


def test_every_cel_rule_is_translated_or_a_transition_rule():
    for kind in KINDS:  # compiling raises NotImplementedError on a rule nobody translated
        assert crds._compiled_schema(kind)["additionalProperties"] is False


def test_an_untranslated_rule_fails_loudly():
    node = {"type": "integer", "x-kubernetes-validations": [{"rule": "self % 2 == 0", "message": "even"}]}
    with pytest.raises(NotImplementedError, match="self % 2 == 0"):
        crds._strict(node, ".spec.x")


def test_compiled_validators_are_cached():
    assert crds._validator("TrainJob") is crds._validator("TrainJob")


def test_the_vendored_schemas_carry_their_origin():
    for kind in KINDS:
        text = (crds.VENDORED_DIR / f"{kind.lower()}.yaml").read_text()
        assert "kubeflow/trainer" in text.splitlines()[1] and "Apache License, Version 2.0" in text
        assert crds._crd(kind)["kind"] == kind


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"no upstream CRDs at {UPSTREAM} to compare with")
@pytest.mark.parametrize("plural", ["trainjobs", "trainingruntimes", "clustertrainingruntimes"])
def test_the_vendored_schemas_match_upstream(plural, tmp_path):
    written = crds.vendor_crd(UPSTREAM / f"trainer.kubeflow.org_{plural}.yaml", tmp_path, upstream="test")
    assert yaml.safe_load(written.read_text()) == crds._crd(yaml.safe_load(written.read_text())["kind"])


def test_a_valid_object_is_not_mutated():
    obj = trainjob()
    before = copy.deepcopy(obj)
    validate(obj)
    assert obj == before
