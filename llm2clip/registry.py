"""Register a trained LLM2CLIP model in the MLflow registry: lineage tags and the alias gate.

:func:`register_model` is the library side of the ``register`` stage:

1. refuses to go on without evaluation metrics or without the primary metric;
2. registers the caption encoder as its own model (``<name>-caption-encoder``), once per distinct
   encoder (found again by :func:`encoder_fingerprint`), so an 8B LLM is stored once, not in
   every vision version;
3. logs the vision model as an MLflow pyfunc (:mod:`llm2clip.pyfunc`) and registers it as a new
   version of ``<name>`` with the caller's lineage tags, ``metric.<key>`` tags, the link to the
   encoder version and the data revision of the registering run (``data_revision``, from its
   ``llm2clip.data_revision`` tag: ``common.data_revision``); the version gets the ``challenger`` alias;
4. moves ``champion`` to it only when its primary metric beats the champion's (read from the
   champion's ``metric.<key>`` tag) by more than ``promote_margin``, or when there is no
   champion; ``promotion_decision`` / ``promotion_reason`` say what happened and why.

Concurrent registrations of one model (two pipelines finishing at once) are serialised where it
matters: reading the champion, deciding and moving the aliases happen under a registry lock
(:func:`registry_lock`: a registered model ``<name>.lock`` that only one client can create, the
backend's unique constraint deciding), so exactly one champion results, the better one.

Reruns are idempotent: each version carries a ``content_fingerprint`` (sha256 of the weights,
the model config, the metrics and the encoder fingerprint); a rerun on the same inputs finds
that version and returns it (``reused=True``) without creating another one.

A registration cut short (the tracking server or its artifact store failing mid-way) leaves
nothing that readers take as finished, and its rerun finishes it instead of adding a version:

- a version is created only after all its files are uploaded, with all its lineage tags at once
  and ``registration_state=incomplete``;
- the gate writes the decision tags first, then moves ``challenger`` / ``champion``, and marks the
  version ``registration_state=complete`` last: an alias (``models:/<name>@champion``,
  :func:`load_champion`, :func:`champion_metrics`, the next gate) never points at a version whose
  tags are not all written;
- the rerun's "same content" lookup reuses only a complete version; an incomplete one is gated
  again (taking over the alias lock that the cut registration may have left) and completed;
- an outage is one :class:`RegistrationError` line (``register failed: ...``, exit code 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from llm2clip import tower_kinds
from llm2clip.io import StageError, s3_retry_env, sha256_file

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ENCODER_SUFFIX = "-caption-encoder"
METRIC_PREFIX = "metric."
FINGERPRINT_TAG = "content_fingerprint"
ENCODER_FINGERPRINT_TAG = "caption_encoder_fingerprint"
DECISION_TAG, REASON_TAG = "promotion_decision", "promotion_reason"
STATE_TAG, COMPLETE, INCOMPLETE = "registration_state", "complete", "incomplete"
DATA_REVISION_TAG = "data_revision"
PROMOTED, NOT_PROMOTED = "promoted", "not_promoted"
# A registered model name (and the caption encoder's): what MLflow accepts in a models:/ URI.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RegistrationError(StageError, ValueError):
    """Registration cannot go on; the message says what is missing and what to run."""


@dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_model` did.

    Attributes:
        name: Registered model name.
        version: The version (new, or the one found again).
        model_uri: ``models:/<name>/<version>``.
        aliases: The version's aliases afterwards.
        promoted: The version's promotion decision (made when it was first registered).
        reused: True when no new version was created (same content registered before).
        reason: Why it was or was not promoted.
        primary_metric: The metric the gate compared.
        metric: Its value for this version.
        champion_before: The champion version before this call (None: there was none).
        champion_before_metric: Its primary metric (None: none, or it has no such tag).
        champion_after: The champion version afterwards.
        caption_encoder_uri: ``models:/<name>-caption-encoder/<version>``, or "" without one.
        fingerprint: The version's ``content_fingerprint``.
    """

    name: str
    version: str
    model_uri: str
    aliases: tuple[str, ...]
    promoted: bool
    reused: bool
    reason: str
    primary_metric: str
    metric: float
    champion_before: str | None
    champion_before_metric: float | None
    champion_after: str | None
    caption_encoder_uri: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ fingerprints


def metric_tag(key: str) -> str:
    """``recall@1`` -> ``metric.recall_at_1`` (MLflow keys allow ``[\\w.\\- /:]`` only)."""
    key = key.replace("@", "_at_")
    return METRIC_PREFIX + re.sub(r"[^\w.\- /:]", "_", key)


def check_metrics(metrics: dict[str, Any] | None, primary_metric: str) -> dict[str, float]:
    """Flatten nested metrics (``{"a": {"b": 1}}`` -> ``a.b``), keep the numbers, check the primary.

    Raises:
        RegistrationError: No numeric metrics, or the primary metric missing or not finite.
    """
    from llm2clip.tracking import flatten

    flat = {k: float(v) for k, v in flatten(dict(metrics or {})).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not flat:
        raise RegistrationError("register needs evaluation metrics and got none: run the `evaluate` "
                                "stage first and pass its metrics.json to register")
    if primary_metric not in flat:
        raise RegistrationError(f"the primary metric {primary_metric!r} is not among the evaluation metrics "
                                f"{sorted(flat)}: run `evaluate` so it reports {primary_metric!r}, or set "
                                "evaluate.primary_metric to one of those")
    if not math.isfinite(flat[primary_metric]):
        raise RegistrationError(f"the primary metric {primary_metric!r} is {flat[primary_metric]}; "
                                "fix the evaluation before registering")
    return flat


def read_model_dir(model_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The weights' sha256 and the config of an exported model dir.

    Raises:
        RegistrationError: Not an exported LLM2CLIP model (run ``train_vision``).
    """
    from llm2clip.vision.model import CONFIG_FILE, WEIGHTS_FILE

    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise RegistrationError(f"{model_dir} has no {WEIGHTS_FILE} + {CONFIG_FILE}: pass the model exported "
                                "by the `train_vision` stage")
    return sha256_file(weights_path), json.loads(config_path.read_text())


def encoder_fingerprint(encoder_dir: str | Path) -> str:
    """The caption encoder's fingerprint, as ``embed_captions`` recorded it in the embeddings
    manifest and ``train_vision`` in the model config (:func:`llm2clip.text.embed.encoder_fingerprint`:
    weights, config, tokenizer files and encoder settings), so the three can be compared.

    Raises:
        RegistrationError: Not a saved encoder dir (no ``config.json`` or no safetensors).
    """
    from llm2clip.text.embed import encoder_fingerprint as embedding_fingerprint

    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "config.json").is_file() or not any(encoder_dir.glob("*.safetensors")):
        raise RegistrationError(f"{encoder_dir} is not a saved caption encoder (config.json + safetensors): "
                                "pass the dir written by the `caption_contrastive` stage")
    return embedding_fingerprint(encoder_dir)


def content_fingerprint(weights_sha256: str, config: dict[str, Any], metrics: dict[str, float],
                        encoder_fp: str) -> str:
    """sha256 of what makes a version: weights, config (minus local paths), metrics, encoder."""
    config = json.loads(json.dumps(config))
    if isinstance(config.get("caption_encoder"), dict):
        config["caption_encoder"].pop("path", None)  # where it was trained, not what it is
    payload = {"weights": weights_sha256, "config": config, "metrics": metrics, "caption_encoder": encoder_fp}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pip_requirements(tower_kind: str = "") -> list[str]:
    """Pinned runtime requirements of the pyfunc models (the installed versions; mlflow is added
    by MLflow itself, ``llm2clip`` travels as code).

    Args:
        tower_kind: The served model's tower kind; its ``requirements`` in
            :data:`llm2clip.tower_kinds.TOWERS` are added. "" (the caption encoder): none.
    """
    packages = ("torch", "transformers", "safetensors", "pillow", "numpy", "pandas",
                *(tower_kinds.tower_kind(tower_kind).requirements if tower_kind else ()))
    return [f"{pkg}=={installed_version(pkg).split('+')[0]}" for pkg in packages]


# ----------------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[Any]:
    """Point MLflow's fluent API at ``uri`` for the block (restored after); yields a client.

    MLflow's own S3 client (artifacts written or read directly, not through the server) gets the
    project's S3 retries (:func:`llm2clip.io.s3_retry_env`) unless the environment sets them.
    """
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    for key, value in s3_retry_env().items():
        os.environ.setdefault(key, value)
    with _use_tracking_uri(uri):
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


def _find_version(client: Any, name: str, tag: str, value: str) -> Any:
    """The newest version of ``name`` whose tag ``tag`` equals ``value`` (None if none)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _complete(model_version: Any) -> bool:
    """Whether the version's registration finished (versions from before ``registration_state``
    existed count as finished once they have their decision)."""
    tags = model_version.tags
    return tags.get(STATE_TAG, COMPLETE) == COMPLETE and DECISION_TAG in tags


def _ensure_registered_model(client: Any, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _experiment_id(client: Any, experiment: str, run_id: str | None) -> str:
    if run_id:
        return client.get_run(run_id).info.experiment_id
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(experiment)
    except MlflowException as err:  # another registration created it meanwhile
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        return client.get_experiment_by_name(experiment).experiment_id


def _log_pyfunc(client: Any, kind: str, artifacts: dict[str, str], *, experiment_id: str,
                run_id: str | None, model_config: dict[str, Any] | None = None, tower_kind: str = "") -> Any:
    """Log one pyfunc from :data:`llm2clip.pyfunc.MODEL_CODE` with ``llm2clip`` as code path."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    import llm2clip
    from llm2clip import pyfunc

    vision = kind == "vision"
    logged = client.create_logged_model(experiment_id, name=kind, source_run_id=run_id,
                                        tags={"llm2clip.kind": kind})
    with tempfile.TemporaryDirectory(prefix="llm2clip-pyfunc-") as tmp, warnings.catch_warnings():
        # No input example for the encoder on purpose: MLflow would load the LLM to check it.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        code = Path(tmp) / f"{kind}_model.py"
        code.write_text(pyfunc.MODEL_CODE[kind])
        info = mlflow.pyfunc.log_model(
            name=kind, python_model=str(code), artifacts=artifacts, model_id=logged.model_id,
            code_paths=[str(Path(llm2clip.__file__).parent)], pip_requirements=pip_requirements(tower_kind),
            signature=pyfunc.vision_signature() if vision else pyfunc.caption_encoder_signature(),
            input_example=pyfunc.vision_input_example() if vision else None,
            model_config=model_config,
        )
    if run_id:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return info


def _register_encoder(client: Any, encoder_dir: str | Path, name: str, *, experiment_id: str,
                      run_id: str | None) -> tuple[str, str]:
    """Register the caption encoder unless this exact encoder is already a version of ``name``."""
    fingerprint = encoder_fingerprint(encoder_dir)
    _ensure_registered_model(client, name, "LLM2CLIP caption encoder: captions -> LLM embeddings.")
    if found := _find_version(client, name, ENCODER_FINGERPRINT_TAG, fingerprint):
        log.info("caption encoder already registered as %s/%s", name, found.version)
        return str(found.version), fingerprint
    info = _log_pyfunc(client, "caption_encoder", {"caption_encoder": str(encoder_dir)},
                       experiment_id=experiment_id, run_id=run_id)
    config = json.loads((Path(encoder_dir) / "config.json").read_text())
    tags = {ENCODER_FINGERPRINT_TAG: fingerprint, "embedding_dim": config.get("hidden_size", ""),
            "model_type": config.get("model_type", "")}
    version = str(client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                              model_id=info.model_id).version)
    log.info("registered caption encoder %s/%s (%s)", name, version, fingerprint[:12])
    return version, fingerprint


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _tag_float(model_version: Any, key: str) -> float | None:
    try:
        return float(model_version.tags[key])
    except (KeyError, ValueError):
        return None


def decide(value: float, champion: Any, primary_metric: str, margin: float,
           greater_is_better: bool) -> tuple[bool, float | None, str]:
    """The alias gate: ``(promote, champion_metric, reason)``.

    Promote when there is no champion, or when the new value beats the champion's
    ``metric.<primary>`` tag by more than ``margin`` (in the better direction). A champion
    without that tag is never replaced automatically (move the alias by hand).
    """
    if champion is None:
        return True, None, f"promoted: there was no champion before it; {primary_metric}={value:.6g}"
    best = _tag_float(champion, metric_tag(primary_metric))
    if best is None:
        return False, None, (f"champion v{champion.version} has no numeric {metric_tag(primary_metric)} tag "
                             f"to compare with; kept it (set the alias by hand to replace it)")
    gain = (value - best) if greater_is_better else (best - value)
    verdict = "beats" if gain > margin else "does not beat"
    return gain > margin, best, (f"{primary_metric}={value:.6g} {verdict} champion v{champion.version} "
                                 f"({best:.6g}) by more than the margin {margin:g} (gain {gain:+.6g})")


def _stage_model(model_dir: Path, tmp: Path) -> Path:
    """Only the exported files (a train_vision output may hold checkpoints next to them)."""
    import shutil

    from llm2clip.vision.model import CONFIG_FILE, WEIGHTS_FILE

    staged = tmp / "model"
    staged.mkdir()
    for file in (WEIGHTS_FILE, CONFIG_FILE, "manifest.json"):
        if (model_dir / file).is_file():
            try:
                os.link(model_dir / file, staged / file)
            except OSError:
                shutil.copy2(model_dir / file, staged / file)
    return staged


def _run_data_revision(client: Any, run_id: str | None) -> dict[str, str]:
    """``{data_revision: REV}`` from the registering run's lineage tag (empty without a run or a revision)."""
    from llm2clip.tracking import DATA_REVISION_TAG as RUN_TAG

    revision = client.get_run(run_id).data.tags.get(RUN_TAG, "") if run_id else ""
    return {DATA_REVISION_TAG: revision} if revision else {}


def _version_tags(tags: dict[str, Any] | None, metrics: dict[str, float], **extra: Any) -> dict[str, str]:
    out = {str(k): str(v) for k, v in (tags or {}).items()}
    out.update({metric_tag(k): repr(v) for k, v in metrics.items()})
    out.update({k: str(v) for k, v in extra.items()})
    return out


def register_model(model_dir: str | Path, caption_encoder_dir: str | Path | None, metrics: dict[str, Any], *,
                   name: str, primary_metric: str, promote_margin: float = 0.0, tracking_uri: str,
                   tags: dict[str, Any] | None = None, greater_is_better: bool = True,
                   experiment: str = "llm2clip", run_id: str | None = None,
                   caption_encoder_name: str | None = None) -> RegistrationResult:
    """Register an exported LLM2CLIP model (and its caption encoder) and apply the alias gate.

    Args:
        model_dir: The exported model (``model.safetensors`` + ``llm2clip_config.json``).
        caption_encoder_dir: The saved caption encoder; None registers an image-only model.
        metrics: Evaluation metrics (nested dicts are flattened to ``a.b``; non-numbers ignored).
        name: Registered model name (``[A-Za-z0-9._-]``).
        primary_metric: The metric the gate compares (a key of the flattened ``metrics``).
        promote_margin: How much better than the champion a version must be to replace it.
        tracking_uri: MLflow tracking (and registry) URI.
        tags: Lineage tags for the version (git rev, data checksums, params hash, KFP run id,
            eval protocol, ...), written as given. The run's data revision is added as
            ``data_revision`` unless ``tags`` has one.
        greater_is_better: Direction of ``primary_metric``.
        experiment: Experiment that holds the logged models (ignored when ``run_id`` is given).
        run_id: The register stage's run; the logged models are linked to it.
        caption_encoder_name: Registered name of the encoder; default ``<name>-caption-encoder``.

    Returns:
        What was registered and decided.

    Raises:
        RegistrationError: No metrics, no primary metric, or not a model / encoder dir; or the
            tracking server (or its artifact store) failed mid-way: nothing unfinished is visible
            through an alias, and a rerun finishes the registration.
    """
    for given in (name, caption_encoder_name or name):
        if not _NAME.match(given):
            raise RegistrationError(f"registered model name {given!r}: use letters, digits, '.', '_', '-'")
    flat = check_metrics(metrics, primary_metric)
    weights_sha, config = read_model_dir(model_dir)
    encoder_fp = encoder_fingerprint(caption_encoder_dir) if caption_encoder_dir else ""
    fingerprint = content_fingerprint(weights_sha, config, flat, encoder_fp)
    value = flat[primary_metric]
    with _tracking(tracking_uri) as client, _cut_short_is_one_error(name, tracking_uri):
        _ensure_registered_model(client, name, "LLM2CLIP: images and/or captions -> unit-norm embeddings.")
        champion = _champion(client, name)
        version = _find_version(client, name, FINGERPRINT_TAG, fingerprint)
        if version is not None and _complete(version):
            log.info("%s/%s has the same content (%s): reused", name, version.version, fingerprint[:12])
            version = client.get_model_version(name, str(version.version))  # search omits aliases
            return _result(client, version, True, value, primary_metric, champion)
        if version is None:
            version_tags = _version_tags(
                {**_run_data_revision(client, run_id), **(tags or {})}, flat, primary_metric=primary_metric,
                promote_margin=promote_margin, greater_is_better=greater_is_better, weights_sha256=weights_sha,
                embed_dim=config.get("embed_dim", ""), **{FINGERPRINT_TAG: fingerprint, STATE_TAG: INCOMPLETE})
            version = _create_version(
                client, Path(model_dir), caption_encoder_dir, name=name, config=config, tags=version_tags,
                encoder_name=caption_encoder_name or name + ENCODER_SUFFIX, encoder_fp=encoder_fp,
                experiment_id=_experiment_id(client, experiment, run_id), run_id=run_id)
        else:
            log.info("finishing the interrupted registration of %s/%s", name, version.version)
        with registry_lock(client, name, gating=str(version.version)):  # the champion now, not before the upload
            champion = _champion(client, name)
            _gate(client, version, value, primary_metric, promote_margin, greater_is_better, champion)
        version = client.get_model_version(name, str(version.version))
        return _result(client, version, False, value, primary_metric, champion)


@contextlib.contextmanager
def _cut_short_is_one_error(name: str, tracking_uri: str) -> Iterator[None]:
    """The tracking server (or its artifact store) failing mid-way: one :class:`RegistrationError`."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    from llm2clip.tracking import is_outage

    try:
        yield
    except (MlflowException, RequestException) as err:  # not a local OSError (a full disk says so itself)
        if not is_outage(err):
            raise
        first = err  # the failed request itself, not a later one of MLflow cleaning up after it
        while isinstance(inner := first.__cause__ or first.__context__, MlflowException) and is_outage(inner):
            first = inner
        text = " ".join(str(first).split())
        where = re.search(r"request to \S*?/api/2\.0/(\S+)", text)
        cause = text.partition("(Caused by ")[2].removesuffix(")") or text
        raise RegistrationError(
            f"registering {name} was cut short: the MLflow server {tracking_uri} (or its artifact store) failed"
            f"{' on ' + where[1] if where else ''} ({cause[:300]}); no alias points at a version with missing files or "
            "tags: run register again once it answers, it finishes this registration without a duplicate version"
        ) from err


LOCK_SUFFIX = ".lock"
LOCK_WAIT_S = 900.0  # how long a registration waits for another one's lock
LOCK_STALE_S = 600.0  # a lock older than this was left by a registration that died: broken


@contextlib.contextmanager
def registry_lock(client: Any, name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S,
                  poll_s: float = 0.5, gating: str = "") -> Iterator[None]:
    """Hold the alias lock of registered model ``name`` for the block.

    The lock is a registered model ``<name>.lock``: creating one that exists fails in the
    backend (a unique name), so one client holds it at a time, on any store MLflow supports. Its
    tags say who holds it since when, and which version it gates; one older than ``stale_s`` (its
    holder died) is deleted and taken, with a warning. So is one held for the version ``gating``
    (a registration of it cut short by an outage could not release it; gating that version again
    decides the same). It is released only while it is still this holder's.

    Raises:
        RegistrationError: still held by another registration after ``wait_s``.
    """
    import socket
    import time
    import uuid

    from mlflow.exceptions import MlflowException

    lock, owner = f"{name}{LOCK_SUFFIX}", f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner, "since": f"{time.time():.3f}",
                                                       **({"version": gating} if gating else {})},
                                           description=f"held while a registration of {name} moves its aliases")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_holder(client, lock)
        age = time.time() - held[1] if held is not None else 0.0
        if held is not None and (age > stale_s or (gating and held[2] == gating)):
            why = "stale, broken" if age > stale_s else f"held for version {gating}, which this call finishes: taken"
            log.warning("registry lock %s held by %s since %.0f s: %s", lock, held[0], age, why)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            holder = f"{held[0]}, for {time.time() - held[1]:.0f} s" if held else "another registration"
            raise RegistrationError(f"registered model {name}: its alias lock {lock} is held by {holder}; "
                                    f"retry when that registration ends, or delete {lock} if it died")
        time.sleep(poll_s)
    try:
        yield
    finally:
        _release(client, lock, owner, stale_s)


def _release(client: Any, lock: str, owner: str, stale_s: float) -> None:
    """Delete the lock if it is still ``owner``'s; an outage leaves it (a warning says so)."""
    from mlflow.exceptions import MlflowException

    from llm2clip.tracking import is_outage

    try:
        held = _lock_holder(client, lock, quiet=False)
        if held is not None and held[0] == owner:
            client.delete_registered_model(lock)
            return
    except MlflowException as err:
        if is_outage(err):  # the error that cut the block short (if any) goes on
            log.warning("registry lock %s could not be released (the tracking server does not answer): the "
                        "rerun of this registration takes it over; others wait until it is stale (%.0f s) or "
                        "someone deletes it", lock, stale_s)
            return
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    log.warning("registry lock %s was broken by another registration while held (held over %.0f s)", lock, stale_s)


def _lock_holder(client: Any, lock: str, quiet: bool = True) -> tuple[str, float, str] | None:
    """``(owner, since, version gated)`` of the lock; None when there is none (or, ``quiet``, it
    cannot be read)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException as err:
        if quiet or err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # released meanwhile
        raise
    try:
        since = float(tags.get("since", "0"))
    except ValueError:
        since = 0.0
    return tags.get("owner", "?"), since, tags.get("version", "")


def _create_version(client: Any, model_dir: Path, encoder_dir: str | Path | None, *, name: str,
                    config: dict[str, Any], tags: dict[str, str], encoder_name: str, encoder_fp: str,
                    experiment_id: str, run_id: str | None) -> Any:
    """Register the encoder (if new), log the vision pyfunc linked to it, create the version."""
    from llm2clip.pyfunc import ENCODER_URI_KEY, MODEL_ARTIFACT

    encoder_uri = ""
    if encoder_dir:
        encoder_version, _ = _register_encoder(client, encoder_dir, encoder_name,
                                               experiment_id=experiment_id, run_id=run_id)
        encoder_uri = f"models:/{encoder_name}/{encoder_version}"
        tags = {**tags, "caption_encoder_model": encoder_name, "caption_encoder_version": encoder_version,
                ENCODER_FINGERPRINT_TAG: encoder_fp}
    # what trained it: the loss (models saved before losses had names were trained with CLIP's)
    tags = {**tags, "loss": config.get("loss", "clip"),
            "tower": config.get("tower", {}).get("spec", {}).get("kind", "")}
    trained_with = (config.get("caption_encoder") or {}).get("fingerprint")
    if encoder_fp and trained_with and trained_with != encoder_fp:
        log.warning("the model config names caption encoder %s; the encoder given has fingerprint %s",
                    trained_with, encoder_fp)
    with tempfile.TemporaryDirectory(prefix="llm2clip-register-") as tmp:
        staged = _stage_model(model_dir, Path(tmp))
        info = _log_pyfunc(client, "vision", {MODEL_ARTIFACT: str(staged)}, experiment_id=experiment_id,
                           run_id=run_id, model_config={ENCODER_URI_KEY: encoder_uri},
                           tower_kind=config.get("tower", {}).get("spec", {}).get("kind", ""))
    version = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                          model_id=info.model_id)
    log.info("registered %s/%s (%s)", name, version.version, tags[FINGERPRINT_TAG][:12])
    return version


def _gate(client: Any, version: Any, value: float, primary_metric: str, margin: float,
          greater_is_better: bool, champion: Any) -> None:
    """Decide; write the decision tags; move ``challenger`` (and ``champion`` if it wins); mark the
    version complete. In this order, an alias never points at a version whose tags are not all
    written, and a registration cut short anywhere here is incomplete, so its rerun gates it again."""
    name, number = version.name, str(version.version)
    if champion is not None and str(champion.version) == number:  # cut short after the champion moved
        promote, before = True, version.tags.get("champion_before", "")
        reason = version.tags.get(REASON_TAG) or "already the champion (an interrupted registration, finished now)"
    else:
        promote, _, reason = decide(value, champion, primary_metric, margin, greater_is_better)
        before = str(champion.version) if champion is not None else ""
    decision = PROMOTED if promote else NOT_PROMOTED
    for key, tag in (("champion_before", before), (REASON_TAG, reason), (DECISION_TAG, decision)):
        client.set_model_version_tag(name, number, key, tag)
    client.set_registered_model_alias(name, CHALLENGER, number)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, number)
    client.set_model_version_tag(name, number, STATE_TAG, COMPLETE)
    log.info("%s/%s: %s (%s)", name, number, decision, reason)


def _version_of(model_version: Any) -> str | None:
    return None if model_version is None else str(model_version.version)


def _result(client: Any, version: Any, reused: bool, value: float, primary_metric: str,
            champion_before: Any) -> RegistrationResult:
    name = version.name
    after = _champion(client, name)
    before_metric = None
    if champion_before is not None:
        before_metric = _tag_float(champion_before, metric_tag(primary_metric))
    tags = version.tags
    encoder_uri = ""
    if tags.get("caption_encoder_model"):
        encoder_uri = f"models:/{tags['caption_encoder_model']}/{tags['caption_encoder_version']}"
    return RegistrationResult(
        name=name, version=str(version.version), model_uri=f"models:/{name}/{version.version}",
        aliases=tuple(sorted(version.aliases)), promoted=tags.get(DECISION_TAG) == PROMOTED, reused=reused,
        reason=tags.get(REASON_TAG, ""), primary_metric=primary_metric, metric=value,
        champion_before=_version_of(champion_before), champion_before_metric=before_metric,
        champion_after=_version_of(after),
        caption_encoder_uri=encoder_uri, fingerprint=tags.get(FINGERPRINT_TAG, ""),
    )


def load_champion(name: str, tracking_uri: str):
    """``mlflow.pyfunc.load_model("models:/<name>@champion")`` against ``tracking_uri``.

    The caption encoder (if any) is fetched from the same registry on the first caption.
    """
    import mlflow

    with _tracking(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


def champion_metrics(name: str, tracking_uri: str) -> dict[str, float]:
    """The current champion's metrics (its ``metric.<key>`` tags); {} when there is no champion.

    Tag keys had ``@`` written as ``_at_``; the metric names of this project never contain ``@``,
    so the keys come back unchanged.
    """
    from mlflow.exceptions import MlflowException

    with _tracking(tracking_uri) as client:
        try:
            champion = _champion(client, name)
        except MlflowException as err:
            log.warning("could not read the champion of %s: %s", name, err)
            return {}
        if champion is None:
            return {}
        values = {k.removeprefix(METRIC_PREFIX): _tag_float(champion, k) for k in champion.tags
                  if k.startswith(METRIC_PREFIX)}
        return {k: v for k, v in values.items() if v is not None}
