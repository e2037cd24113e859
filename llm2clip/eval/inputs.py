"""Which directories each eval set scores: the pipeline's own data, explicit dirs, or a prepared
evaluation set found by name.

``prepare_data --eval-set NAME`` writes a prepare_data output whose manifest records
``eval_set: NAME`` (one split, ``test``); ``embed_captions`` on it records the same name in its
own manifest. evaluate is given lists of such outputs (``--eval-data``, ``--eval-embeddings``;
a folder that holds several of them, such as ``data/eval``, stands for each of them) and an
``EvalSet`` with ``eval_data: NAME`` scores the pair of outputs whose manifests name ``NAME``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm2clip.config import EvalSet
from llm2clip.contracts import has_manifest, read_manifest
from llm2clip.io import StageError, is_remote, s3_filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSet:
    """One eval set with the directories it scores.

    Attributes:
        config: The ``evaluate.eval_sets`` entry.
        data: Its prepare_data output.
        embeddings: Its embed_captions output.
        split: The split scored.
    """

    config: EvalSet
    data: str
    embeddings: str
    split: str

    @property
    def name(self) -> str:
        return self.config.name


def expand_outputs(locations: Sequence[str], endpoint_url: str = "") -> list[str]:
    """Stage outputs named by ``locations``: each one that has a manifest, else its sub-folders
    that have one (``data/eval`` -> ``data/eval/coco``, ``data/eval/imagenet``); a location that
    does not exist stands for none."""
    found: list[str] = []
    for location in locations:
        text = str(location).rstrip("/")
        if has_manifest(text, endpoint_url):
            found.append(text)
        elif is_remote(text):
            fs = s3_filesystem(endpoint_url)
            children = sorted(fs.ls(text, detail=False)) if fs.exists(text) else []
            found += [f"s3://{c.removeprefix('s3://')}" for c in children
                      if has_manifest(f"s3://{c.removeprefix('s3://')}", endpoint_url)]
        elif Path(text).is_dir():
            found += [str(c) for c in sorted(Path(text).iterdir()) if c.is_dir() and has_manifest(c)]
        else:
            log.info("evaluate: %s does not exist; no eval set there", text)
    return found


def index_eval_sets(stage: str, locations: Sequence[str], endpoint_url: str = "") -> dict[str, str]:
    """``{eval set name: output dir}`` of the ``stage`` outputs in ``locations``.

    Outputs whose manifest names no ``eval_set`` (the training data) are skipped.

    Raises:
        StageError: a location that is another stage's output, or two outputs of one name.
    """
    index: dict[str, str] = {}
    for location in expand_outputs(locations, endpoint_url):
        name = read_manifest(stage, location, endpoint_url).get("eval_set")
        if not name:
            log.info("evaluate: %s is no evaluation set (its manifest names no eval_set); skipped", location)
            continue
        if name in index:
            raise StageError(f"two {stage} outputs are eval set {name!r}: {index[name]} and {location}; "
                             f"pass one of them")
        index[name] = location
    return index


def _missing(eval_set: EvalSet, what: str, flag: str, index: dict[str, str], locations: Sequence[str]) -> StageError:
    name = eval_set.eval_data
    given = ", ".join(map(str, locations)) or "none given"
    found = ", ".join(sorted(index)) or "none"
    how = (f"`dvc repro prepare_eval@{name} embed_eval@{name}` (KFP: set {name}'s prepare and embed tasks), or "
           f"`python -m llm2clip prepare_data --eval-set {name}` then `embed_captions --eval-set {name}`"
           if what == "prepared" else
           f"`dvc repro embed_eval@{name}` (KFP: set {name}'s embed task), or "
           f"`python -m llm2clip embed_captions --eval-set {name}`")
    return StageError(f"evaluate.eval_sets[{eval_set.name}]: no {what} eval set {name!r} among {flag} ({given}; "
                      f"sets found: {found}); run {how}")


def resolve_eval_sets(eval_sets: Sequence[EvalSet], data: str, embeddings: str, eval_data: Sequence[str] = (),
                      eval_embeddings: Sequence[str] = (), endpoint_url: str = "") -> list[ResolvedSet]:
    """The directories and split of every eval set.

    ``data``/``embeddings`` of the set when given, else the prepared eval set its ``eval_data``
    names (found in ``eval_data``/``eval_embeddings`` by the name their manifests record), else
    the pipeline's own ``data``/``embeddings``.

    Raises:
        StageError: a named set that is not among the given outputs (naming what to run), or two
            outputs claiming one name.
    """
    named = [s for s in eval_sets if s.eval_data]
    prepared = index_eval_sets("prepare_data", eval_data, endpoint_url) if named else {}
    embedded = index_eval_sets("embed_captions", eval_embeddings, endpoint_url) if named else {}
    out = []
    for s in eval_sets:
        if s.eval_data:
            if s.eval_data not in prepared:
                raise _missing(s, "prepared", "--eval-data", prepared, eval_data)
            if s.eval_data not in embedded:
                raise _missing(s, "embedded", "--eval-embeddings", embedded, eval_embeddings)
            out.append(ResolvedSet(s, prepared[s.eval_data], embedded[s.eval_data], s.resolved_split))
        else:
            out.append(ResolvedSet(s, s.data or data, s.embeddings or embeddings, s.resolved_split))
    return out
