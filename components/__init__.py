"""KFP components: one interface file per stage (``components/<stage>/component.py``).

A component holds no logic. Its body calls :func:`llm2clip.cluster.task.run_task` with its
artifacts, which runs ``llm2clip.stages.<stage>.run`` (in the task's pod, or as a Kubeflow
Trainer TrainJob for a training stage whose cluster profile asks for one), so a pipeline task
runs the same code as ``dvc repro``.

Images: every task's image is a pipeline parameter (``image`` for CPU tasks, ``gpu_image`` for
tasks with accelerators). Their defaults are the tags :func:`image_tag` names for this source
tree, ``<version>-<source digest>-<flavor>``: the digest covers everything the Dockerfile copies
into the image, so a code change is a new tag, and a new tag is a new KFP cache key.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

from llm2clip import __version__

REPO = Path(__file__).resolve().parents[1]
IMAGE_REPOSITORY = "ghcr.io/llm2clip/llm2clip"
FLAVORS = {"cpu": "cpu", "gpu": "cu128"}
"""Image flavor -> tag suffix and Dockerfile ``TORCH_FLAVOR`` build arg (the torch wheel index)."""
_IMAGE_SOURCES = ("pyproject.toml", "Dockerfile", "llm2clip")


def source_digest(root: Path = REPO) -> str:
    """12 hex digits of sha256 over the files the image is built from (paths and contents)."""
    digest = hashlib.sha256()
    for name in _IMAGE_SOURCES:
        base = root / name
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image_tag(flavor: str = "cpu", repository: str = IMAGE_REPOSITORY, root: Path = REPO) -> str:
    """The image of this source tree: ``<repository>:<version>-<source digest>-<cpu|cu128>``."""
    if flavor not in FLAVORS:
        raise ValueError(f"image flavor {flavor!r}: one of {sorted(FLAVORS)}")
    return f"{repository}:{__version__}-{source_digest(root)}-{FLAVORS[flavor]}"


IMAGE = image_tag("cpu")
"""Base image of every component; each task's image is replaced by a pipeline parameter."""


def component(stage: str) -> Any:
    """The KFP component of ``stage``: ``components.<stage>.component.<stage>``."""
    return getattr(importlib.import_module(f"components.{stage}.component"), stage)


def fanout_components(stage: str) -> tuple[Any, Any]:
    """The group and merge components of a stage that fans out (``components/<stage>/fanout.py``)."""
    module = importlib.import_module(f"components.{stage}.fanout")
    return getattr(module, f"{stage}_group"), getattr(module, f"{stage}_merge")
