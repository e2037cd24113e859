"""A model of KFP's task cache key, to check what moves it (no KFP backend runs here).

The KFP v2 backend (driver ``getFingerPrint`` -> ``cacheutils.GenerateCacheKey``, backend
2.4-2.17) hashes a ``CacheKey`` proto as JSON with sha256. Its fields:

- ``inputParameterValues``: every input parameter of the task, resolved (pipeline arguments,
  constants; a task's image set from a pipeline parameter adds ``pipelinechannel--<param>``);
- ``inputArtifactNames``: the MLMD ids of the input artifacts (new ids when the producer ran
  again, the same ids when the producer was a cache hit and reused its outputs);
- ``outputArtifactsSpec`` / ``outputParametersSpec``: output names and types;
- ``containerSpec``: the image and command + args as written in the IR; PVC names (none here).

Env vars, resources, node selectors, tolerations, secrets and retries are not part of it.
:func:`task_cache_keys` follows those rules over a compiled pipeline; tests use it to show the
key moves with data, the stage's section, code and image, and with nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_SELECTOR = re.compile(r'^parseJson\(string_value\)\["([^"]+)"\]$')


def _parameter_value(binding: dict[str, Any], scope: dict[str, Any]) -> Any:
    if "componentInputParameter" in binding:
        value = scope.get(binding["componentInputParameter"])
        selector = binding.get("parameterExpressionSelector")
        if selector:  # a field of a ParallelFor item: parseJson(string_value)["field"]
            match = _SELECTOR.match(selector)
            if not match:
                raise ValueError(f"unsupported parameter selector {selector!r}")
            value = value[match.group(1)]
        return value
    if "runtimeValue" in binding:
        return binding["runtimeValue"]["constant"]
    raise ValueError(f"unsupported parameter binding {binding}")


def _artifact_id(binding: dict[str, Any], produced: dict[str, dict[str, str]], scope: dict[str, str]) -> str:
    if "taskOutputArtifact" in binding:
        out = binding["taskOutputArtifact"]
        return produced[out["producerTask"]][out["outputArtifactKey"]]
    return scope[binding["componentInputArtifact"]]


def _topological(tasks: dict[str, dict]) -> list[str]:
    done: list[str] = []
    while len(done) < len(tasks):
        ready = [k for k, t in tasks.items() if k not in done and set(t.get("dependentTasks", [])) <= set(done)]
        if not ready:
            raise ValueError("the pipeline DAG has a cycle")
        done += sorted(ready)
    return done


def task_cache_keys(spec: dict[str, Any], arguments: dict[str, Any]) -> dict[str, str]:
    """``{task display name: cache key}`` of one run of the compiled pipeline ``spec``.

    A task inside a ParallelFor appears once per item, as ``<display name>[<item index>]``; a
    collected output's artifact id is the list of the iterations' ids (a new item, or one item
    that reran, changes what its consumer reads).

    Args:
        spec: The compiled ``PipelineSpec`` (first YAML document).
        arguments: The run's pipeline arguments (absent ones take the pipeline's defaults).
    """
    root = spec["root"]
    params = {name: arguments.get(name, p.get("defaultValue"))
              for name, p in root["inputDefinitions"]["parameters"].items()}
    keys: dict[str, str] = {}
    _dag_keys(spec, root["dag"]["tasks"], params, {}, keys, "")
    return keys


def _dag_keys(spec: dict[str, Any], tasks: dict[str, dict], params: dict[str, Any], artifacts: dict[str, str],
              keys: dict[str, str], suffix: str) -> dict[str, dict[str, str]]:
    """Keys of one DAG's tasks into ``keys``; returns ``{task: {output artifact: id}}``."""
    produced: dict[str, dict[str, str]] = {}
    for name in _topological(tasks):
        task = tasks[name]
        component = spec["components"][task["componentRef"]["name"]]
        inputs = task.get("inputs", {})
        values = {p: _parameter_value(b, params) for p, b in inputs.get("parameters", {}).items()}
        arts = {a: _artifact_id(b, produced, artifacts) for a, b in inputs.get("artifacts", {}).items()}
        if "dag" in component:
            produced[name] = _sub_dag(spec, task, component["dag"], values, arts, keys, suffix)
            continue
        container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        outputs = component.get("outputDefinitions", {})
        key = {
            "inputParameterValues": values,
            # an artifact's id is fixed by the execution that made it: a cache hit reuses it
            "inputArtifactNames": arts,
            "outputArtifactsSpec": {a: s["artifactType"] for a, s in outputs.get("artifacts", {}).items()},
            "outputParametersSpec": {p: s["parameterType"] for p, s in outputs.get("parameters", {}).items()},
            "containerSpec": {"image": container["image"],
                              "cmdArgs": list(container.get("command", [])) + list(container.get("args", []))},
        }
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        keys[task["taskInfo"]["name"] + suffix] = digest
        produced[name] = {a: f"{digest}/{a}" for a in outputs.get("artifacts", {})}
    return produced


def _sub_dag(spec: dict[str, Any], task: dict, dag: dict, values: dict[str, Any], arts: dict[str, str],
             keys: dict[str, str], suffix: str) -> dict[str, str]:
    """A ParallelFor (or plain sub-DAG) task: its DAG once per item; outputs collected per item."""
    iterator = task.get("parameterIterator")
    items: list[Any] = []
    if iterator:  # a list compiled into the spec (a fan-out's parts) or a pipeline parameter (the eval sets)
        source = iterator["items"]
        items = json.loads(source["raw"]) if "raw" in source else values[source["inputParameter"]]
    runs = [dict(values, **{iterator["itemInput"]: item}) for item in items] if iterator else [values]
    collected: dict[str, list[str]] = {out: [] for out in dag.get("outputs", {}).get("artifacts", {})}
    for i, scope in enumerate(runs):
        inner = _dag_keys(spec, dag["tasks"], scope, arts, keys, f"{suffix}[{i}]" if iterator else suffix)
        for out, selector in dag.get("outputs", {}).get("artifacts", {}).items():
            (select,) = selector["artifactSelectors"]
            collected[out].append(inner[select["producerSubtask"]][select["outputArtifactKey"]])
    return {out: json.dumps(ids) for out, ids in collected.items()}
