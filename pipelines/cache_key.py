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
from typing import Any


def _parameter_value(binding: dict[str, Any], arguments: dict[str, Any], defaults: dict[str, Any]) -> Any:
    if "componentInputParameter" in binding:
        name = binding["componentInputParameter"]
        return arguments.get(name, defaults.get(name))
    if "runtimeValue" in binding:
        return binding["runtimeValue"]["constant"]
    raise ValueError(f"unsupported parameter binding {binding}")


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

    Args:
        spec: The compiled ``PipelineSpec`` (first YAML document).
        arguments: The run's pipeline arguments (absent ones take the pipeline's defaults).
    """
    root = spec["root"]
    defaults = {name: p.get("defaultValue") for name, p in root["inputDefinitions"]["parameters"].items()}
    tasks = root["dag"]["tasks"]
    keys: dict[str, str] = {}
    for name in _topological(tasks):
        task = tasks[name]
        component = spec["components"][task["componentRef"]["name"]]
        container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        inputs = task.get("inputs", {})
        outputs = component.get("outputDefinitions", {})
        key = {
            "inputParameterValues": {p: _parameter_value(b, arguments, defaults)
                                     for p, b in inputs.get("parameters", {}).items()},
            # an artifact's id is fixed by the execution that made it: a cache hit reuses it
            "inputArtifactNames": {a: f"{keys[b['taskOutputArtifact']['producerTask']]}/"
                                      f"{b['taskOutputArtifact']['outputArtifactKey']}"
                                   for a, b in inputs.get("artifacts", {}).items()},
            "outputArtifactsSpec": {a: s["artifactType"] for a, s in outputs.get("artifacts", {}).items()},
            "outputParametersSpec": {p: s["parameterType"] for p, s in outputs.get("parameters", {}).items()},
            "containerSpec": {"image": container["image"],
                              "cmdArgs": list(container.get("command", [])) + list(container.get("args", []))},
        }
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        keys[name] = hashlib.sha256(text.encode()).hexdigest()
    return {tasks[k]["taskInfo"]["name"]: v for k, v in keys.items()}
