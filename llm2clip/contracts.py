"""Stage contracts: what each stage's ``manifest.json`` holds, written and read in one place.

Every stage output is a directory (local or ``s3://``) whose ``manifest.json`` is its commit mark:
written last, it names the stage that wrote it, the ``format_version`` of its layout, and what
the output holds (checksums, counts, what it was made from). This module is the only writer of
that file (a test walks the package to keep it so) and the one place that reads it as a given
stage's output::

    write_manifest("embed_captions", out, body)      # stamps stage + format_version, checks, writes
    read_manifest("prepare_data", data, endpoint)    # refuses a missing/foreign/unreadable manifest

A :class:`Contract` per stage names the top-level fields its readers rely on (``required``:
checked on read and on write) and the further fields its writer always records (``written``:
checked on write only, so hand-made fixtures and older outputs with fewer fields still read).
The on-disk format is the one the stages wrote before this module: same field names, same
versions, ``json.dumps(indent=2, sort_keys=True)``.

A refused manifest is a one-line :class:`~llm2clip.io.StageError` that names the stage to re-run.
What a field *means* stays with the module that uses it (:mod:`llm2clip.data.shards`,
:mod:`llm2clip.data.sidecars`, :mod:`llm2clip.lineage`, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.io import StageError, atomic_write_bytes, atomic_write_json, is_remote, s3_filesystem

MANIFEST = "manifest.json"


def rerun(stage: str) -> str:
    """How to re-run ``stage``, under DVC and under KFP (the tail of every refusal message)."""
    return f"re-run `dvc repro {stage}` (KFP: the {stage} task)"


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class Contract:
    """The manifest of one stage's output.

    Attributes:
        stage: The stage that writes it (its ``stage`` field).
        format_version: The layout version this code writes and reads.
        noun: What the output is, in words (for messages): ``"a caption encoder"``.
        required: Top-level fields every reader relies on; checked on read and on write.
        written: Further top-level fields the writer always records; checked on write.
        unversioned_is_v1: Read a manifest without ``format_version`` as version 1 (a stage
            whose writer recorded none before the contracts existed).
    """

    stage: str
    format_version: int
    noun: str
    required: tuple[str, ...] = ()
    written: tuple[str, ...] = ()
    unversioned_is_v1: bool = False

    def version_of(self, manifest: dict[str, Any]) -> Any:
        """The manifest's ``format_version`` (1 for an unversioned one where that is allowed)."""
        if "format_version" not in manifest and self.unversioned_is_v1:
            return 1
        return manifest.get("format_version")

    def refusal(self, manifest: Any, location: str) -> str | None:
        """Why ``manifest`` cannot be read as this stage's output (None: it can)."""
        head = f"{location} is not {_a(self.stage)} v{self.format_version} output"
        if not isinstance(manifest, dict):
            return f"{head}: its manifest is not a JSON object; {rerun(self.stage)}"
        found, version = manifest.get("stage"), self.version_of(manifest)
        if found != self.stage:
            what = f"a {found!r} output" if found else "an output that names no stage"
            return (f"{head}: it is {what}, not {self.noun}, and so it is not {_a(self.stage)} output; pass "
                    f"the {self.stage} output, or {rerun(self.stage)} if there is none")
        if version != self.format_version:
            return (f"{head}: its manifest says format {version!r}, which this code does not read; "
                    f"{rerun(self.stage)} with this code")
        missing = [f for f in self.required if f not in manifest]
        if missing:
            return f"{head}: its manifest lacks {', '.join(missing)}; {rerun(self.stage)}"
        return None


CONTRACTS: dict[str, Contract] = {c.stage: c for c in (
    Contract("prepare_data", 1, "a prepared data set",
             required=("caption_fields", "shards"),
             written=("config_hash", "counts", "image", "split", "sources", "labels", "validation", "quarantine")),
    # caption_contrastive wrote no format_version before the contracts: such outputs (and plain
    # encoder dirs that only say their stage) read as version 1, the layout they have.
    Contract("caption_contrastive", 1, "a caption encoder",
             written=("config_hash", "base_model", "resolved_model", "cra_before", "cra_after", "data", "training",
                      "wall_time_s", "probe", "settings_file", "settings", "embedding_dim", "cra_protocol",
                      "files"),
             unversioned_is_v1=True),
    Contract("embed_captions", 1, "caption embeddings",
             required=("caption_fields", "encoder", "sidecars"),
             written=("layout", "dim", "dtype", "normalized", "precision", "counts", "zeroshot", "config_hash",
                      "data")),
    Contract("train_vision", 1, "an exported vision model",
             required=("inputs",),
             written=("config_hash", "model", "training", "val_protocol", "files")),
    Contract("evaluate", 1, "an evaluation report",
             required=("primary_metric", "gate_passed", "inputs"),
             written=("config_hash", "primary", "min_primary", "protocol", "eval_sets", "metrics", "champion",
                      "caption_encoder")),
    Contract("register", 1, "a model registration",
             required=("model_uri", "version"),
             written=("alias", "promoted", "reused", "metrics", "champion_uri", "reason")),
)}


def contract(stage: str) -> Contract:
    """The contract of ``stage`` (a ValueError, listing the known stages, for an unknown one)."""
    try:
        return CONTRACTS[stage]
    except KeyError:
        raise ValueError(f"no manifest contract for stage {stage!r}; known: {', '.join(CONTRACTS)}") from None


def manifest_location(location: str | os.PathLike) -> str:
    """``<dir>/manifest.json`` for an output dir (a path that already names the file is kept)."""
    text = str(location)
    if text.rstrip("/").endswith(f"/{MANIFEST}") or text == MANIFEST:
        return text
    return f"{text.rstrip('/')}/{MANIFEST}" if is_remote(text) else str(Path(text) / MANIFEST)


def _output_of(location: str | os.PathLike) -> str:
    """The output dir a location names (for messages)."""
    text = str(location).rstrip("/")
    return text[: -len(MANIFEST) - 1] if text.endswith(f"/{MANIFEST}") else text


def write_manifest(stage: str, location: str | os.PathLike, body: dict[str, Any],
                   endpoint_url: str = "") -> dict[str, Any]:
    """Write ``stage``'s ``manifest.json`` into ``location`` (an output dir or the file's path).

    ``stage`` and ``format_version`` are stamped from the contract (a ``body`` that states other
    ones is a bug). Local targets are written atomically (temp file + rename); the stages write
    an ``s3://`` output into a local staging dir that :func:`llm2clip.io.output_dir` uploads,
    manifest last, and a direct ``s3://`` target is one PUT (S3 objects appear whole).

    Returns:
        The manifest as written.

    Raises:
        ValueError: ``body`` lacks a field of the contract or states another stage/version.
    """
    c = contract(stage)
    for key, value in (("stage", c.stage), ("format_version", c.format_version)):
        if key in body and body[key] != value:
            raise ValueError(f"{stage} manifest: {key} {body[key]!r} given, the contract says {value!r}")
    manifest = {**body, "stage": c.stage, "format_version": c.format_version}
    missing = [f for f in (*c.required, *c.written) if f not in manifest]
    if missing:
        raise ValueError(f"{stage} manifest lacks {', '.join(missing)} (llm2clip.contracts); the writer is out of "
                         "date with its contract")
    target = manifest_location(location)
    if is_remote(target):
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"  # as atomic_write_json
        s3_filesystem(endpoint_url).pipe_file(target, text.encode("utf-8"))
    else:
        atomic_write_json(target, manifest)
    return manifest


def _load(target: str, endpoint_url: str) -> bytes | None:
    if is_remote(target):
        fs = s3_filesystem(endpoint_url)
        return fs.cat(target) if fs.exists(target) else None
    path = Path(target)
    return path.read_bytes() if path.is_file() else None


def has_manifest(location: str | os.PathLike, endpoint_url: str = "") -> bool:
    """Whether ``location`` holds a ``manifest.json`` (of any stage): a finished output."""
    target = manifest_location(location)
    if is_remote(target):
        return s3_filesystem(endpoint_url).exists(target)
    return Path(target).is_file()


def read_manifest(stage: str, location: str | os.PathLike, endpoint_url: str = "") -> dict[str, Any]:
    """Read ``location``'s ``manifest.json`` as ``stage``'s output (local or ``s3://``).

    Args:
        stage: The stage whose output ``location`` must be.
        location: The output dir (or its manifest's path).
        endpoint_url: S3 endpoint for ``s3://`` locations.

    Returns:
        The manifest (an unversioned one that its contract reads as version 1 is returned as is).

    Raises:
        StageError: one line naming ``stage`` to re-run: no manifest (``stage`` has not
            finished there), not JSON, another stage's output, a format version this code does
            not read, or a required field missing.
    """
    c, target, where = contract(stage), manifest_location(location), _output_of(location)
    data = _load(target, endpoint_url)
    if data is None:
        raise StageError(f"{target} not found: {where} has no {MANIFEST} ({stage} has not finished there); "
                         f"run {stage} first: `dvc repro {stage}` (KFP: the {stage} task)")
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise StageError(f"{target} is not valid JSON ({err}); {rerun(stage)}") from None
    why = c.refusal(manifest, where)
    if why:
        raise StageError(why)
    return manifest


def remove_manifest(location: str | os.PathLike, endpoint_url: str = "") -> bool:
    """Remove ``location``'s ``manifest.json``, so the output reads unfinished until rewritten.

    Returns:
        Whether there was one.
    """
    target = manifest_location(location)
    if is_remote(target):
        fs = s3_filesystem(endpoint_url)
        if not fs.exists(target):
            return False
        fs.rm(target)
        return True
    path = Path(target)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def mirror_manifest(location: str | os.PathLike, local_dir: str | os.PathLike, endpoint_url: str = "") -> None:
    """Copy ``location``'s ``manifest.json`` byte for byte into ``local_dir`` (of any stage).

    For a copy of an output that already committed (the KFP task's local artifact folder of an
    output written straight to ``s3://``): same bytes, so an upload of the copy changes nothing.

    Raises:
        StageError: ``location`` has no manifest.
    """
    target = manifest_location(location)
    data = _load(target, endpoint_url)
    if data is None:
        raise StageError(f"{target} not found: the stage that writes {_output_of(location)} has not finished")
    atomic_write_bytes(Path(local_dir) / MANIFEST, data)
