"""Typed configuration: one frozen dataclass per params.yaml section.

``params.yaml`` has a ``common`` section and one section per stage. Loading validates the whole
file: an unknown key, a wrong type or a bad value is a :class:`ConfigError` that names the key
(``prepare_data.sources[0].count: expected int, got 'many'``). ``--set section.key=value``
overrides are applied to the raw mapping *before* validation, so they get the same checks.

Derived configurations (DeepSpeed JSON, LoRA config, ...) are computed from these classes by the
code that needs them; they are never kept as second files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A params file or override that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------------------------
# common


@dataclass(frozen=True)
class CommonConfig:
    """Settings every stage reads.

    Attributes:
        seed: Global seed; every stage derives its own generators from it.
        experiment: MLflow experiment name.
        tracking: Log runs to MLflow. Off: stages run the same and log nothing.
        tracking_uri: MLflow tracking URI. Empty: ``$MLFLOW_TRACKING_URI``, else a local
            ``sqlite:///mlflow.db`` in the working directory.
        s3_endpoint_url: S3 endpoint for ``s3://`` inputs/outputs (MinIO, moto). Empty: the
            AWS default (or ``$AWS_ENDPOINT_URL``). Credentials always come from the
            environment or AWS profile, never from params.
        caption_fields: Named caption types every prepared sample carries, in order. The first
            two are the caption-contrastive pair and the default CRA pair.
    """

    seed: int = 0
    experiment: str = "llm2clip"
    tracking: bool = True
    tracking_uri: str = ""
    s3_endpoint_url: str = ""
    caption_fields: tuple[str, ...] = ("short", "dense")

    def __post_init__(self) -> None:
        if len(self.caption_fields) < 1:
            raise ConfigError("common.caption_fields: at least one caption field is needed")
        if len(set(self.caption_fields)) != len(self.caption_fields):
            raise ConfigError(f"common.caption_fields: duplicate names in {self.caption_fields}")


# --------------------------------------------------------------------------------------------
# prepare_data: sources


@dataclass(frozen=True)
class SyntheticSource:
    """Built-in compositional scenes (shapes, colours, sizes, counts, relations, words).

    Every image gets a short and a dense caption of the same scene; deterministic by seed.
    """

    kind: Literal["synthetic"] = "synthetic"
    name: str = "synthetic"
    count: int = 400
    image_size: int = 128


@dataclass(frozen=True)
class EmojiSource:
    """Noto Color Emoji glyphs with their human-written CLDR names (``emoji`` package).

    ``count`` 0 takes every renderable emoji. Off with a clear message when the font is absent.
    """

    kind: Literal["emoji"] = "emoji"
    name: str = "emoji"
    count: int = 0
    image_size: int = 96
    font_path: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


@dataclass(frozen=True)
class WebDatasetSource:
    """img2dataset-style webdataset shards (``jpg``/``png``/``webp`` + ``txt`` + ``json``).

    Attributes:
        urls: Brace pattern or comma-separated list, local paths or ``s3://``.
        caption_fields: Output caption name -> source field: ``txt`` or ``json:<key>``
            (e.g. ``{"short": "json:shortSV_captions", "dense": "json:longSV_captions"}``).
            A json field may hold a string or a list of strings.
    """

    kind: Literal["webdataset"] = "webdataset"
    name: str = "webdataset"
    urls: str = ""
    caption_fields: dict[str, str] = field(default_factory=lambda: {"short": "txt"})


@dataclass(frozen=True)
class ManifestSource:
    """A CSV or JSONL manifest plus an image folder.

    Attributes:
        path: The ``.csv`` / ``.jsonl`` file (local or ``s3://``).
        image_root: Folder image paths are relative to; empty: the manifest's folder.
        image_column: Column holding the image path.
        caption_columns: Output caption name -> column (a JSONL value may be a list).
        key_column: Column with a stable sample id; empty: derived from the image path.
    """

    kind: Literal["manifest"] = "manifest"
    name: str = "manifest"
    path: str = ""
    image_root: str = ""
    image_column: str = "image"
    caption_columns: dict[str, str] = field(default_factory=lambda: {"short": "caption"})
    key_column: str = ""


Source = Union[SyntheticSource, EmojiSource, WebDatasetSource, ManifestSource]


@dataclass(frozen=True)
class ValidationConfig:
    """Per-sample checks and the table-level great-expectations gate.

    Attributes:
        min_image_side: Smallest accepted width/height in pixels.
        max_aspect_ratio: Largest accepted long side / short side.
        max_image_pixels: Decompression-bomb guard: larger images are rejected before decoding.
        min_caption_chars: Shortest accepted caption after normalisation.
        max_caption_chars: Longer captions are cut at a word boundary (and counted).
        min_captions: Samples with fewer named captions are rejected.
        min_valid_fraction: The stage fails when fewer samples than this survive.
        max_rows: Upper row-count bound of the great-expectations suite.
    """

    min_image_side: int = 32
    max_aspect_ratio: float = 4.0
    max_image_pixels: int = 40_000_000
    min_caption_chars: int = 3
    max_caption_chars: int = 2000
    min_captions: int = 2
    min_valid_fraction: float = 0.9
    max_rows: int = 100_000_000


@dataclass(frozen=True)
class PrepareDataConfig:
    """prepare_data: sources -> validated, deduplicated, split webdataset shards.

    Attributes:
        sources: Where samples come from; several are mixed in order.
        val_fraction: Share of keys (by hash) that go to ``val``.
        shard_size: Samples per output shard.
        image_max_side: Images are downscaled so the long side is at most this.
        jpeg_quality: Quality of the re-encoded jpg.
    """

    sources: tuple[Source, ...] = (SyntheticSource(),)
    val_fraction: float = 0.1
    shard_size: int = 256
    image_max_side: int = 256
    jpeg_quality: int = 90
    validation: ValidationConfig = ValidationConfig()

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("prepare_data.sources: at least one source is needed")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"prepare_data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"prepare_data.sources: source names must be unique, got {names}")
        if self.shard_size < 1:
            raise ConfigError("prepare_data.shard_size: must be >= 1")


# --------------------------------------------------------------------------------------------
# the whole file


@dataclass(frozen=True)
class Params:
    """The whole params file: ``common`` plus one section per stage."""

    common: CommonConfig = CommonConfig()
    prepare_data: PrepareDataConfig = PrepareDataConfig()

    def section(self, name: str) -> Any:
        """The config of stage ``name``."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples become lists); ``from_dict`` round-trips it."""
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# loading, validation, overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if all(dataclasses.is_dataclass(a) for a in options):
            return _convert_tagged(value, options, where)
        for option in options:
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _convert(k, key_type, f"{where}.{k}"): _convert(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported field type {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_tagged(value: Any, options: list[type], where: str) -> Any:
    """A union of dataclasses is told apart by its ``kind`` field."""
    kinds = {f.default: cls for cls in options for f in dataclasses.fields(cls) if f.name == "kind"}
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{where}: expected a mapping with 'kind' (one of {sorted(kinds)})")
    if value["kind"] not in kinds:
        raise ConfigError(f"{where}.kind: must be one of {sorted(kinds)}, got {value['kind']!r}")
    return from_dict(kinds[value["kind"]], value, where)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (known keys: {', '.join(sorted(known))})"
        )
    kwargs = {
        name: _convert(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw params mapping (a deep copy is returned).

    Values are parsed as YAML (``3``, ``1e-4``, ``true``, ``[a, b]``). A list element is
    addressed by its index: ``prepare_data.sources.0.count=50``. A key that exists neither in
    the file nor in the schema is caught by the validation that follows.
    """
    out = json.loads(json.dumps(raw))
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        keys = path.split(".")
        if len(keys) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node: Any = out
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_index(key, node, keys[: i + 1])]
            else:
                node = node.setdefault(key, {})
        value = yaml.safe_load(text) if text.strip() else ""
        last = keys[-1]
        if isinstance(node, list):
            node[_index(last, node, keys)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is not a section")
    return out


def _index(key: str, node: list, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set: {'.'.join(keys)} is not an index of a {len(node)}-item list")
    return int(key)


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Load, override and validate a params file (``None``: all defaults)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"params file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(Params, apply_overrides(raw, overrides or []))


def config_hash(*configs: Any) -> str:
    """Stable short hash of one or more configs (what a stage's outputs depend on)."""
    text = json.dumps([to_dict(c) for c in configs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sections(stage: str, common: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any]:
    """Validate one stage's section plus ``common`` given as plain dicts (the KFP path).

    Returns:
        ``(stage_config, common_config)``, checked exactly like a params file.
    """
    params = from_dict(Params, {"common": common, stage: config})
    return params.section(stage), params.common
