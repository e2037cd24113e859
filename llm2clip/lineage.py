"""Lineage checks: is what a stage consumes what its upstream stage recorded?

Every stage output is a directory whose ``manifest.json`` records what it was made from:

- embed_captions records the caption encoder's fingerprint (``encoder.fingerprint``), the
  embedding width (``dim``) and the sha256 of the data manifest it embedded
  (``data.manifest_sha256``);
- train_vision writes that fingerprint and width into the model's ``llm2clip_config.json``
  (``caption_encoder.fingerprint``, ``llm_embedding_dim``);
- evaluate records the sha256 of the model manifest it scored (``inputs.vision_model``) and the
  fingerprint of the encoder whose embeddings it scored (``caption_encoder.fingerprint``).

The functions here compare those records with the inputs a stage is given. A mismatch is a
:class:`~llm2clip.io.StageError` that names what differs and the stage to re-run; nothing is
scored, trained or registered on inputs that do not belong together.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.contracts import has_manifest, read_manifest, rerun
from llm2clip.io import StageError, dir_fingerprint, is_remote, s3_filesystem

MODEL_CONFIG_FILE = "llm2clip_config.json"
"""``llm2clip.vision.model.CONFIG_FILE``, named here so that the stages that check lineage do not
import (and so, for DVC, depend on) the vision package; a test keeps the two equal."""

log = logging.getLogger(__name__)


def _short(fingerprint: str | None) -> str:
    return (fingerprint or "none")[:16]


@dataclass(frozen=True)
class ModelLineage:
    """What an exported vision model was trained on (from its ``llm2clip_config.json``).

    Attributes:
        path: The model directory.
        llm_dim: Width of the caption embeddings its adapter takes.
        fingerprint: Fingerprint of the caption encoder whose embeddings it was trained on
            (None for a model exported without one, e.g. built outside train_vision).
    """

    path: str
    llm_dim: int
    fingerprint: str | None


def read_model_lineage(vision_model: str, endpoint_url: str = "") -> ModelLineage:
    """Read :class:`ModelLineage` from a train_vision output without loading the weights.

    Raises:
        StageError: no ``llm2clip_config.json`` (not an exported model, or unfinished).
    """
    path = f"{str(vision_model).rstrip('/')}/{MODEL_CONFIG_FILE}"
    try:
        if is_remote(path):
            config = json.loads(s3_filesystem(endpoint_url).cat(path))
        else:
            config = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise StageError(f"{path} not found: {vision_model} is not an exported LLM2CLIP model; "
                         f"{rerun('train_vision')}") from err
    caption = config.get("caption_encoder") or {}
    return ModelLineage(str(vision_model), int(config["llm_embedding_dim"]), caption.get("fingerprint"))


# ----------------------------------------------------------------------------- embed_captions


def check_caption_encoder_dir(caption_encoder: str, source: str) -> None:
    """Refuse a caption_encoder input that is not a finished caption_contrastive output.

    A plain model directory (no ``manifest.json``: a hub snapshot, a packaged model) is accepted
    and embeds with its settings file or the defaults. A directory with a manifest must be a
    caption_contrastive output whose settings file is present and unchanged.

    Args:
        caption_encoder: The input as given (for messages).
        source: The resolved local directory (or a hub id, which is not checked).

    Raises:
        StageError: another stage's output, or the settings file missing or changed.
    """
    from llm2clip.text.encoder import SETTINGS_FILE

    root = Path(source)
    if is_remote(source) or not has_manifest(root):
        return
    try:
        manifest = read_manifest("caption_contrastive", root)  # its contract: stage and format
    except StageError as err:
        given = "" if str(caption_encoder) == str(source) else f" {caption_encoder}"
        raise StageError(f"caption_encoder{given}: {err}") from None
    settings = root / SETTINGS_FILE
    if not settings.is_file():
        raise StageError(f"caption_encoder {caption_encoder} has no {SETTINGS_FILE}: its pooling, attention, "
                         f"prompt and max length are unknown (unfinished, or changed after caption_contrastive); "
                         f"{rerun('caption_contrastive')}")
    recorded, found = manifest.get("settings"), json.loads(settings.read_text())
    if recorded is not None and recorded != found:
        keys = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
        raise StageError(f"caption_encoder {caption_encoder}: {SETTINGS_FILE} differs from the settings "
                         f"caption_contrastive recorded in its manifest ({', '.join(keys)}); "
                         f"{rerun('caption_contrastive')}")


# ----------------------------------------------------------------------------- embeddings vs data


def check_made_from(data: str, embeddings: str, manifest: dict[str, Any], data_sha256: str, *,
                    consumer: str) -> None:
    """Refuse embeddings that embed_captions made from another data manifest than ``data``'s.

    The per-shard alignment (:func:`llm2clip.data.sidecars.verify_sidecars`) catches changed
    shards; this catches the rest (another prepare_data run, caption fields, config). Embeddings
    that record no data manifest (written before it was recorded) rely on the alignment alone.

    Raises:
        StageError: the recorded data manifest sha256 differs from ``data_sha256``.
    """
    recorded = (manifest.get("data") or {}).get("manifest_sha256")
    if recorded is None:
        log.info("%s: %s records no data manifest sha256; checked by shard alignment only", consumer, embeddings)
        return
    if recorded != data_sha256:
        raise StageError(f"{consumer}: the embeddings in {embeddings} were made from a data manifest with "
                         f"sha256 {_short(recorded)}, but {data} has {_short(data_sha256)}: the data changed "
                         f"after embed_captions, or the embeddings belong to another data set; "
                         f"{rerun('embed_captions')}")


def check_embeddings(data: str, embeddings: str, endpoint_url: str, *, consumer: str,
                     check_files: bool = True) -> dict[str, Any]:
    """Embeddings that belong to ``data``: an embed_captions output aligned with its shards and
    made from its manifest.

    Returns:
        The embeddings manifest.

    Raises:
        StageError: saying what differs and that embed_captions must be re-run.
    """
    from llm2clip.data.sidecars import verify_sidecars

    manifest = verify_sidecars(data, embeddings, endpoint_url=endpoint_url, check_keys=False,
                               check_files=check_files)
    check_made_from(data, embeddings, manifest, dir_fingerprint(data, endpoint_url), consumer=consumer)
    return manifest


# ----------------------------------------------------------------------------- embeddings vs model

_EITHER = ("re-run embed_captions with the caption encoder the model was trained with "
           "(`dvc repro embed_captions`; KFP: the embed_captions task), or evaluate the model trained on these "
           "embeddings (`dvc repro train_vision`)")


def check_embeddings_fit_model(embeddings: str, manifest: dict[str, Any], model: ModelLineage) -> None:
    """Refuse embeddings of another width or another caption encoder than ``model`` was trained on.

    Raises:
        StageError: the width (``dim``) or the encoder fingerprint differs.
    """
    dim, made_with = manifest.get("dim"), manifest["encoder"]["fingerprint"]
    if dim is None:
        raise StageError(f"the embeddings in {embeddings} hold sidecars of different widths (no single dim "
                         f"in its manifest); {rerun('embed_captions')}")
    if int(dim) != model.llm_dim:
        raise StageError(f"the embeddings in {embeddings} are {dim}-wide (caption encoder {_short(made_with)}), "
                         f"but the model in {model.path} takes {model.llm_dim}-wide caption embeddings "
                         f"(trained on caption encoder {_short(model.fingerprint)}): {_EITHER}")
    if model.fingerprint is None:
        log.warning("the model in %s records no caption encoder fingerprint: cannot check that the embeddings "
                    "in %s (caption encoder %s) are the kind it was trained on", model.path, embeddings,
                    _short(made_with))
    elif made_with != model.fingerprint:
        raise StageError(f"embeddings in {embeddings} were made with caption encoder {made_with}, but the model "
                         f"in {model.path} was trained on embeddings of {model.fingerprint}: {_EITHER}")


def check_eval_sets(model: ModelLineage, sets: list[tuple[str, str, str]], endpoint_url: str = "") -> str:
    """Every eval set's embeddings belong to its data and fit ``model``; one caption encoder for all.

    Args:
        model: The model to be scored.
        sets: ``(name, data, embeddings)`` per eval set.
        endpoint_url: S3 endpoint for ``s3://`` dirs.

    Returns:
        The fingerprint of the caption encoder that made the embeddings.

    Raises:
        StageError: naming the set, what differs and the stage to re-run.
    """
    made_with: dict[str, str] = {}
    for name, data, embeddings in sets:
        manifest = check_embeddings(data, embeddings, endpoint_url, consumer=f"evaluate (eval set {name!r})")
        check_embeddings_fit_model(embeddings, manifest, model)
        made_with.setdefault(manifest["encoder"]["fingerprint"], embeddings)
    if len(made_with) > 1:
        listed = "; ".join(f"{emb}: {_short(fp)}" for fp, emb in made_with.items())
        raise StageError(f"the eval sets' embeddings were made with different caption encoders ({listed}); one "
                         f"model scores embeddings of one encoder: {rerun('embed_captions')} for the odd ones")
    return next(iter(made_with))


# ----------------------------------------------------------------------------- register


def check_report_for_model(report: str, evaluation: dict[str, Any], vision_model: str,
                           endpoint_url: str = "") -> None:
    """Refuse an evaluate report that scored another model than ``vision_model``.

    Raises:
        StageError: not an evaluate output, or its recorded model manifest sha256 differs.
    """
    if evaluation.get("stage") != "evaluate":
        raise StageError(f"{report} is not an evaluate output (stage {evaluation.get('stage')!r}); "
                         f"{rerun('evaluate')}")
    recorded = (evaluation.get("inputs") or {}).get("vision_model")
    actual = dir_fingerprint(vision_model, endpoint_url)
    if recorded != actual:
        raise StageError(f"the report in {report} scored a model whose manifest sha256 is {_short(recorded)}, but "
                         f"the model in {vision_model} has {_short(actual)}: the model changed after evaluate, "
                         f"or the report belongs to another model; {rerun('evaluate')}")


def check_encoder_for_model(caption_encoder: str, model: ModelLineage, report: str,
                            evaluation: dict[str, Any]) -> None:
    """Refuse a caption encoder other than the one whose embeddings trained and scored the model.

    Compared with the model config's fingerprint, and with the one evaluate recorded for the
    embeddings it scored. A caption_encoder that is not a local directory is not checked here.

    Raises:
        StageError: the fingerprints differ.
    """
    if is_remote(caption_encoder) or not Path(caption_encoder).is_dir():
        return
    from llm2clip.text.embed import encoder_fingerprint

    actual = encoder_fingerprint(caption_encoder)
    scored = (evaluation.get("caption_encoder") or {}).get("fingerprint")
    for expected, what in ((model.fingerprint, f"the model in {model.path} was trained on embeddings of"),
                           (scored, f"the report in {report} scored embeddings of")):
        if expected is not None and expected != actual:
            raise StageError(f"caption_encoder {caption_encoder} is {actual}, but {what} caption encoder "
                             f"{expected}: register the caption encoder the model was trained with, or "
                             f"{rerun('embed_captions')} with this one (then train_vision and evaluate)")
    if model.fingerprint is None and scored is None:
        log.warning("neither the model in %s nor the report in %s records a caption encoder fingerprint: "
                    "cannot check that %s is the encoder the model was trained with", model.path, report,
                    caption_encoder)
