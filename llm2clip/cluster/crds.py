"""Strict offline validation of Kubeflow Trainer v2 objects (TrainJob, TrainingRuntime, ClusterTrainingRuntime).

The schemas are the CRDs' ``openAPIV3Schema`` of the served version, vendored (descriptions removed)
into ``llm2clip/cluster/crds/<kind>.yaml`` so that the package stands alone. Validation is
*stricter* than the API server on purpose:

- **Unknown fields are errors.** The API server prunes a field its structural schema does not
  declare and answers 201, so a typo (``numNode``) silently becomes the default. Here every object
  schema without ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields: true`` gets
  ``additionalProperties: false``.
- **CEL rules** (``x-kubernetes-validations``) are checked where they can be checked on one object:
  each rule the vendored schemas carry is translated by hand in :data:`_CEL`. Transition rules
  (``self == oldSelf``: "field is immutable") compare an update with the stored object; there is no
  stored object offline, so they are skipped. A rule that is neither translated nor a transition
  rule makes compilation fail, so re-vendoring a newer CRD cannot silently drop a check.
- **Project tightenings** (:data:`_TIGHTER_MINIMUMS`): upstream lets ``spec.trainer.numNodes`` be 0;
  a job with no node is never one we mean to submit, so 0 is refused.
- ``x-kubernetes-list-type: map|set`` uniqueness is checked (the API server rejects duplicates),
  and ``metadata`` is checked as the API server checks it (name, namespace by scope, labels).

OpenAPI v3 is translated to JSON Schema draft 2020-12: ``x-kubernetes-int-or-string`` becomes
"integer or string", ``nullable`` adds ``null``; ``format`` (int32, int64, date-time) is ignored.

Example::

    from llm2clip.cluster.crds import CRDValidationError, validate
    validate(trainjob)  # raises CRDValidationError listing every problem, one per line
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("TrainJob", "TrainingRuntime", "ClusterTrainingRuntime")
"""The Kubeflow Trainer kinds this module validates."""

VENDORED_DIR = Path(__file__).with_name("crds")
"""Where the vendored schemas live (package data)."""

_TIGHTER_MINIMUMS: dict[str, dict[str, int]] = {
    # kind -> {field path: minimum}; stricter than upstream (which says minimum 0 or nothing).
    "TrainJob": {"spec.trainer.numNodes": 1},
    "TrainingRuntime": {"spec.mlPolicy.numNodes": 1},
    "ClusterTrainingRuntime": {"spec.mlPolicy.numNodes": 1},
}

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion",
        "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
        "ownerReferences", "finalizers", "managedFields", "selfLink",
    }
)  # fmt: skip


class CRDValidationError(ValueError):
    """A Kubeflow Trainer object does not validate; ``problems`` holds one line per problem.

    Each line starts with the JSON path of the offending field, e.g.
    ``spec.trainer.numNodes: 0 is less than the minimum of 1``.
    """

    def __init__(self, what: str, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__(f"{what} is invalid ({len(self.problems)} problem(s)):\n" + "\n".join(self.problems))


# --- CEL rules, translated by hand --------------------------------------------------------------


def _name_of(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta.get("name") if isinstance(meta, dict) else None


def _at_least_one(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or value >= 1


def _one_ml_policy(policy: dict) -> bool:
    return sum(key in policy for key in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1


def _startup_without_depends_on(spec: dict) -> bool:
    in_order = (spec.get("startupPolicy") or {}).get("startupPolicyOrder") == "InOrder"
    return not (in_order and any("dependsOn" in job for job in spec.get("replicatedJobs") or []))


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://.+$")
_RFC1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

_CEL: dict[str, tuple[Callable[[Any], bool], str]] = {
    # rule (whitespace-normalised) -> (check on the node's value, field the message is about).
    # A check that meets an unexpected shape returns True: the schema's own type keywords report it.
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": (
        lambda obj: _name_of(obj) is None or bool(_RFC1035_LABEL.fullmatch(str(_name_of(obj)))),
        "metadata.name",
    ),
    "size(self.metadata.name) <= 63": (lambda obj: len(str(_name_of(obj) or "")) <= 63, "metadata.name"),
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')": (
        lambda uri: not isinstance(uri, str) or uri == "" or bool(_URI.search(uri)),
        "",
    ),
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": (
        lambda value: value in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"),
        "",
    ),
    "self >= 1": (_at_least_one, ""),
    "has(self.lastUpdatedTime)": (lambda status: "lastUpdatedTime" in status, ""),
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1": (
        _one_ml_policy,
        "",
    ),
    "!self.exists(c, c == 'node')": (lambda names: "node" not in names, ""),
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))": (_startup_without_depends_on, ""),
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)": (
        lambda policy: all(not (t.get("metadata") or {}).get("namespace") for t in policy.get("templates") or []),
        "",
    ),
}


def _rule_text(rule: dict) -> str:
    return " ".join(str(rule["rule"]).split())


def _is_transition_rule(text: str) -> bool:
    # Transition rules compare with the stored object (oldSelf); offline there is none: skipped.
    return "oldSelf" in text


def _cel_keyword(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    for rule in rules:
        text = _rule_text(rule)
        if _is_transition_rule(text):
            continue
        check, field = _CEL[text]
        try:
            ok = check(instance)
        except (AttributeError, KeyError, TypeError):
            ok = True  # a wrong shape: the type keywords report it
        if not ok:
            path = field.split(".") if field else ()
            yield ValidationError(f"{rule.get('message', text)} (rule: {text})", path=path)


def _list_type_keyword(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if list_type not in ("map", "set") or not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for index, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            identity = repr(tuple(item.get(key) for key in keys))
            what = ", ".join(f"{key}={item.get(key)!r}" for key in keys)
        else:
            identity = repr(item)
            what = repr(item)
        if identity in seen:
            yield ValidationError(f"duplicate entry ({what}) in a list of type {list_type}", path=(index,))
        seen.add(identity)


# --- schema translation: OpenAPI v3 (Kubernetes flavour) -> strict JSON Schema -----------------


def _strict(node: dict, path: str = "") -> dict:
    """A copy of one schema node, translated to JSON Schema and made strict (see module doc)."""
    out = {key: value for key, value in node.items() if key != "description"}
    for rule in out.get("x-kubernetes-validations", []):
        text = _rule_text(rule)
        if not _is_transition_rule(text) and text not in _CEL:
            raise NotImplementedError(f"{path or '(root)'}: CEL rule {text!r} is not translated; add it to _CEL")
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {key: _strict(sub, f"{path}.{key}") for key, sub in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"], f"{path}[]")
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"], f"{path}{{}}")
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub, path) for sub in out[key]]
    if out.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {}, "kind": {}, "metadata": {}, **out.get("properties", {})}
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # what the API server would prune, we refuse
    return out


def _schema_node(schema: dict, dotted: str) -> dict:
    node = schema
    for key in dotted.split("."):
        node = node["properties"][key]
    return node


@functools.cache
def _crd(kind: str) -> dict:
    """The vendored CRD summary of ``kind``: group, version, kind, scope, openAPIV3Schema."""
    path = VENDORED_DIR / f"{kind.lower()}.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)  # nosec B506  # the loader is (C)SafeLoader


@functools.cache
def _compiled_schema(kind: str) -> dict:
    schema = _strict(_crd(kind)["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked by _metadata_problems
    for dotted, minimum in _TIGHTER_MINIMUMS.get(kind, {}).items():
        _schema_node(schema, dotted)["minimum"] = minimum
    return schema


@functools.cache
def _validator(kind: str) -> Any:
    import jsonschema

    cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {"x-kubernetes-validations": _cel_keyword, "x-kubernetes-list-type": _list_type_keyword},
    )
    return cls(_compiled_schema(kind))


# --- problems -> lines --------------------------------------------------------------------------


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out or "(root)"


def _error_lines(error: Any) -> list[str]:
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = list(error.schema.get("properties", {}))
        lines = []
        for extra in (key for key in error.instance if key not in known):
            close = difflib.get_close_matches(str(extra), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{_json_path([*parts, extra])}: unknown field (the API server would prune it{hint})")
        return lines
    return [f"{_json_path(parts)}: {error.message}"]


def _schema_problems(kind: str, obj: dict) -> list[str]:
    errors = sorted(_validator(kind).iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for error in errors for line in _error_lines(error)]


def _qualified_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and not _is_dns_subdomain(prefix):
        return f"prefix {prefix!r} is not a DNS-1123 subdomain"
    if len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        return f"name part {name!r} must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _map_problems(where: str, mapping: Any, *, label_values: bool) -> list[str]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        return [f"{where}: expected a mapping of strings"]
    problems = []
    for key, value in mapping.items():
        path = _json_path([*where.split("."), key])
        if (problem := _qualified_key_problem(str(key))) is not None:
            problems.append(f"{path}: invalid key: {problem}")
        if not isinstance(value, str):
            problems.append(f"{path}: value must be a string, got {type(value).__name__}")
        elif label_values and value and (len(value) > 63 or not _QUALIFIED_NAME.fullmatch(value)):
            problems.append(f"{path}: invalid label value {value!r}")
    return problems


def _is_dns_subdomain(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(value))


def _is_dns_label(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(re.fullmatch(_DNS1123_LABEL, value))


def _metadata_problems(meta: Any, *, namespaced: bool) -> list[str]:
    """ObjectMeta checks the API server makes on a custom resource (names, namespace by scope)."""
    if not isinstance(meta, dict):
        return ["metadata: required, a mapping with at least a name"]
    problems = [f"metadata.{key}: unknown field" for key in meta if key not in _OBJECT_META_FIELDS]
    name = meta.get("name")
    if name is None and not meta.get("generateName"):
        problems.append("metadata.name: required (or metadata.generateName)")
    elif name is not None and not _is_dns_subdomain(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain (lower-case alphanumerics, '-', '.')")
    namespace = meta.get("namespace")
    if not namespaced and namespace is not None:
        problems.append("metadata.namespace: must not be set on a cluster-scoped kind")
    elif namespace is not None and not _is_dns_label(namespace):
        problems.append(f"metadata.namespace: {namespace!r} is not a DNS-1123 label")
    problems += _map_problems("metadata.labels", meta.get("labels"), label_values=True)
    problems += _map_problems("metadata.annotations", meta.get("annotations"), label_values=False)
    return problems


# --- public API ---------------------------------------------------------------------------------


def validate(obj: dict) -> None:
    """Validate one Kubeflow Trainer object strictly against its vendored CRD schema.

    Args:
        obj: The object as a dict (``apiVersion``, ``kind``, ``metadata``, ``spec``...).

    Raises:
        CRDValidationError: Listing every problem, one per line, each with its JSON path; an
            unknown ``kind`` names the known ones.
    """
    if not isinstance(obj, dict):
        raise CRDValidationError("object", [f"(root): expected a mapping, got {type(obj).__name__}"])
    kind = obj.get("kind")
    if kind not in KINDS:
        raise CRDValidationError("object", [f"kind: {kind!r} is not one of the known kinds: {', '.join(KINDS)}"])
    crd = _crd(kind)
    expected = f"{crd['group']}/{crd['version']}"
    problems = []
    if obj.get("apiVersion") != expected:
        problems.append(f"apiVersion: {obj.get('apiVersion')!r} is not served for {kind}; expected {expected!r}")
    problems += _metadata_problems(obj.get("metadata"), namespaced=crd["scope"] == "Namespaced")
    problems += _schema_problems(kind, obj)
    if problems:
        raise CRDValidationError(f"{kind} {_name_of(obj)!r}", problems)
    logger.debug("%s %r validates against %s", kind, _name_of(obj), expected)


def validate_file(path: str | Path) -> list[dict]:
    """Validate every document of a (multi-document) YAML file; each must be one of :data:`KINDS`.

    Returns:
        The documents, in file order (empty documents dropped).

    Raises:
        CRDValidationError: Every problem of every document, each line prefixed by the document index.
    """
    docs = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]
    problems = []
    for index, doc in enumerate(docs):
        try:
            validate(doc)
        except CRDValidationError as error:
            problems += [f"[doc {index}] {line}" for line in error.problems]
    if problems:
        raise CRDValidationError(str(path), problems)
    return docs


# --- vendoring (a maintainer's tool; never called at run time) ---------------------------------


def _without_descriptions(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {key: value for key, value in node.items() if key != "description"}
    if "properties" in out:
        out["properties"] = {key: _without_descriptions(sub) for key, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _without_descriptions(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_without_descriptions(sub) for sub in out[key]]
    return out


def vendor_crd(crd_file: str | Path, dest_dir: str | Path = VENDORED_DIR, *, upstream: str) -> Path:
    """Write the trimmed schema of one upstream CRD file to ``dest_dir/<kind>.yaml``.

    Args:
        crd_file: An upstream ``trainer.kubeflow.org_<plural>.yaml`` (a CustomResourceDefinition).
        dest_dir: Where to write (the package's ``crds/`` folder by default).
        upstream: Where it came from, for the header (repository, path, commit, release line).

    Returns:
        The path written.
    """
    crd = next(doc for doc in yaml.safe_load_all(Path(crd_file).read_text()) if doc)
    served = [version for version in crd["spec"]["versions"] if version.get("served")]
    version = next((v for v in served if v.get("storage")), served[0])
    kind = crd["spec"]["names"]["kind"]
    summary = {
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": kind,
        "scope": crd["spec"]["scope"],
        "openAPIV3Schema": _without_descriptions(version["schema"]["openAPIV3Schema"]),
    }
    header = (
        f"# {kind} ({summary['group']}/{summary['version']}): the openAPIV3Schema of the served version,\n"
        f"# descriptions removed. Vendored from {upstream}, {Path(crd_file).name}.\n"
        "# Copyright The Kubeflow Authors. Licensed under the Apache License, Version 2.0\n"
        "# (http://www.apache.org/licenses/LICENSE-2.0). Regenerate with llm2clip.cluster.crds.vendor_crd.\n"
    )
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    out = Path(dest_dir) / f"{kind.lower()}.yaml"
    out.write_text(header + yaml.dump(summary, Dumper=dumper, sort_keys=False, width=120))
    logger.info("vendored %s %s/%s into %s", kind, summary["group"], summary["version"], out)
    return out
