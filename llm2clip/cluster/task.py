"""What every KFP component's body calls: run one stage for a pipeline task, describe its outputs.

A component only declares its interface. :func:`run_task` decides *where* the stage runs (in
the task's pod, or as a Kubeflow Trainer TrainJob when the compile-time cluster profile asks for
one) and *which locations* it reads and writes. An output whose URI is on S3 (``s3://``, or
KFP's default ``minio://`` mapped to ``s3://`` + ``$AWS_ENDPOINT_URL``) is written by URI, so
outputs and checkpoints land on the object store while the stage runs and survive a lost pod;
inputs are read from the local copies KFP's launcher has already made in the pod. A TrainJob's
nodes share no disk with the pod, so they get every input and output by URI. Without S3
(``kfp.local``) local paths are used throughout. Then every output artifact gets its manifest's
scalars as metadata (what the KFP UI shows).

Artifacts are duck-typed (``.path``, ``.uri``, ``.metadata``, ``Metrics.log_metric``): the
library never imports kfp.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "LLM2CLIP_PIPELINE_RUN_ID"
"""The KFP run id; on a cluster the pod's ``pipeline/runid`` label (downward API) sets it."""
PROFILE_ENV = "LLM2CLIP_CLUSTER_PROFILE"
"""JSON of the cluster profile, set at compile time on tasks that launch a TrainJob."""


def location(artifact: Any) -> str:
    """Where a stage reads/writes ``artifact``: its S3 URI when it has one, else its local path."""
    uri = str(getattr(artifact, "uri", "") or "")
    if uri.startswith("minio://"):
        return "s3://" + uri.removeprefix("minio://")
    return uri if uri.startswith("s3://") else artifact.path


def _profile_from_env(stage: str, num_nodes: int):
    from llm2clip.cluster.profile import ClusterProfile
    from llm2clip.config import ConfigError, from_dict
    from llm2clip.io import StageError

    text = os.environ.get(PROFILE_ENV)
    if not text:
        raise StageError(f"{stage}: a TrainJob task needs ${PROFILE_ENV} (set by pipelines.compile); recompile")
    try:
        profile = from_dict(ClusterProfile, json.loads(text))
    except (ConfigError, json.JSONDecodeError) as err:
        raise StageError(f"{stage}: ${PROFILE_ENV} is not a cluster profile: {err}") from err
    if profile.task(stage).num_nodes != num_nodes:
        raise StageError(f"{stage}: num_nodes {num_nodes} != the profile's {profile.task(stage).num_nodes}; "
                         "recompile the pipeline")
    return profile


def run_task(stage: str, common: dict, config: dict, *, inputs: dict[str, Any], outputs: dict[str, Any],
             num_nodes: int = 1, trainjob_image: str = "", part: tuple[int, int] | None = None,
             parts: list[Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stage`` for one KFP task and put each output's summary into its artifact's metadata.

    Args:
        stage: Stage name.
        common, config: The ``common`` and stage sections as plain dicts (validated by the stage).
        inputs, outputs: ``{name: KFP artifact}`` as the stage table names them.
        num_nodes: TrainJob nodes (training stages; must equal the cluster profile's).
        trainjob_image: Non-empty: run as a Kubeflow Trainer TrainJob of this image.
        part: ``(g, N)``: group task ``g`` of a fan-out (:mod:`llm2clip.data.parts`); its one
            output is the part folder.
        parts: The merge of a fan-out: the group tasks' output artifacts (read from the local
            copies KFP made, like every input).

    Returns:
        ``{output name: metadata}``.
    """
    run_id = os.environ.get(PIPELINE_RUN_ENV, "")
    if trainjob_image:
        from llm2clip.cluster.trainjob import run_trainjob

        where = {name: location(a) for name, a in {**inputs, **outputs}.items()}
        profile = _profile_from_env(stage, num_nodes)
        summary = run_trainjob(stage, common, config, where, image=trainjob_image, profile=profile,
                               pipeline_run_id=run_id)
        metadata = {name: dict(summary) for name in outputs}
    else:
        from llm2clip.stages import run_stage

        where = {name: _input_path(a) for name, a in inputs.items()}
        where |= {name: location(a) for name, a in outputs.items()}
        metadata = run_stage(stage, common, config, where, run_id, part=part,
                             parts=[a.path for a in parts] if parts else None)
    for name, artifact in outputs.items():
        if where[name] != artifact.path:  # written to S3 directly: KFP uploads .path afterwards
            _mirror_manifest(where[name], Path(artifact.path), common.get("s3_endpoint_url", ""),
                             "part.json" if part is not None else "manifest.json")
        artifact.metadata.update(metadata[name])
    log.info("%s: outputs %s", stage, ", ".join(f"{n} -> {where[n]}" for n in outputs))
    return metadata


def _input_path(artifact: Any) -> Any:
    """Where a stage reads an input: a collected input (a list of artifacts) is a list of paths."""
    if isinstance(artifact, (list, tuple)):
        return [a.path for a in artifact]
    return artifact.path


def _mirror_manifest(uri: str, local: Path, endpoint_url: str, name: str = "manifest.json") -> None:
    """Copy the output's manifest (a group task's ``part.json``) into the task's local output
    folder (the same bytes KFP then uploads to the same key), so KFP's own upload of ``.path``
    finds a folder and changes nothing."""
    from llm2clip.contracts import mirror_manifest

    if name == "manifest.json":
        mirror_manifest(uri, local, endpoint_url)
        return
    from llm2clip.io import atomic_write_bytes, s3_filesystem

    atomic_write_bytes(local / name, s3_filesystem(endpoint_url).cat_file(f"{uri.rstrip('/')}/{name}"))


def publish_report(report: Any, common: dict, *, metrics: Any, html: Any, markdown: Any) -> None:
    """evaluate's KFP-native outputs: every scalar of ``metrics.json`` as ``Metrics`` (compared across
    runs in the KFP UI), ``report.html`` as ``HTML`` and ``report.md`` as ``Markdown``.

    Args:
        report: The evaluate task's ``report`` artifact (already written).
        common: The ``common`` section (S3 endpoint).
        metrics, html, markdown: The task's ``Output[Metrics]``/``Output[HTML]``/``Output[Markdown]``.
    """
    folder = location(report)
    endpoint = common.get("s3_endpoint_url", "")
    values = json.loads(_read_text(folder, "metrics.json", endpoint))
    for name, value in sorted(values.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    for artifact, name in ((html, "report.html"), (markdown, "report.md")):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(_read_text(folder, name, endpoint))
    summary = {k: v for k, v in report.metadata.items() if k in ("primary", "primary_metric", "gate_passed")}
    for artifact in (metrics, html, markdown):
        artifact.metadata.update(summary)


def _read_text(folder: str, name: str, endpoint_url: str) -> str:
    from llm2clip.io import is_remote, s3_filesystem

    if is_remote(folder):
        return s3_filesystem(endpoint_url).cat(f"{folder.rstrip('/')}/{name}").decode("utf-8")
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluate wrote no {name}")
    return path.read_text()



def run_import_task(common: dict, repo: str, path: str, data: Any) -> dict[str, Any]:
    """A pipeline started from a DVC-versioned prepared dataset: copy it into ``data`` and describe
    it (its manifest's scalars and where it came from) in the artifact's metadata."""
    from llm2clip.config import load_sections
    from llm2clip.stages import output_metadata
    from llm2clip.stages.prepare_data import run_import

    _, common_cfg = load_sections("prepare_data", common, {})
    where = location(data)
    lineage = run_import(common_cfg, repo=repo, path=path, data=where,
                         pipeline_run_id=os.environ.get(PIPELINE_RUN_ENV, ""))
    if where != data.path:
        _mirror_manifest(where, Path(data.path), common_cfg.s3_endpoint_url)
    metadata = output_metadata(where, common_cfg.s3_endpoint_url) | {f"prepared.{k}": v for k, v in lineage.items()}
    data.metadata.update(metadata)
    return metadata
