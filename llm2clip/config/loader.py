"""Loading, validation and overrides: plain mappings <-> the typed config dataclasses.

``from_dict`` checks a mapping against a dataclass's type hints: an unknown key, a wrong type or
a bad value is a :class:`ConfigError` that names the key (``prepare_data.sources[0].count:
expected int, got 'many'``) and, for an unknown key, lists the known ones. A union of dataclasses
(``prepare_data.sources``) is told apart by its ``kind``.

A params file may start from another one: a top-level ``extends: <path relative to this file>``
deep-merges the file over its base (mappings key by key, lists and scalars replaced), chains are
followed, and ``--set`` overrides apply to the merged mapping (:func:`read_params_mapping`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llm2clip.config.base import ConfigError
from llm2clip.config.common import CommonConfig
from llm2clip.config.params import Params


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
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it): {err}") from err
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


def read_yaml_mapping(path: str | Path, what: str = "params file",
                      shape: str = "a mapping of sections") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML is a ConfigError."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{what} not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {shape} at the top level")
    return raw


EXTENDS = "extends"
"""Top-level key of a params file naming the params file it starts from."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base`` (a new mapping; neither is changed).

    Mappings are merged key by key, recursively; anything else in ``over`` (a list, a scalar,
    ``null``) replaces the base's value whole.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_params_mapping(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a params file, its ``extends:`` chain merged in (no validation).

    ``extends: base.yaml`` (a path relative to the file that names it, or absolute) makes the
    file a set of changes to ``base.yaml``: see :func:`deep_merge`. The base may extend another.

    Raises:
        ConfigError: A missing file or base, bad YAML, an ``extends`` that is not a path, or a
            cycle (the message shows the chain).
    """
    return _resolve_extends(Path(path), [])


def _resolve_extends(path: Path, chain: list[Path]) -> dict[str, Any]:
    here = path.resolve()
    if here in chain:
        names = " -> ".join(str(p) for p in [*chain, here])
        raise ConfigError(f"{chain[0]}: extends cycle: {names}")
    raw = read_yaml_mapping(path)
    if EXTENDS not in raw:
        return raw
    base = raw.pop(EXTENDS)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {EXTENDS}: expected the path of a params file (relative to this "
                          f"file), got {base!r}")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: {EXTENDS}: base params file not found: {base_path}")
    return deep_merge(_resolve_extends(base_path, [*chain, here]), raw)


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Load (following ``extends:``), override and validate a params file (``None``: all defaults)."""
    from llm2clip.config.eval_data import check_names

    raw = read_params_mapping(path) if path is not None else {}
    params = from_dict(Params, apply_overrides(raw, overrides or []))
    # whole-file checks (one stage's sections, as a KFP task gets them, may differ: an eval set's
    # common has its own caption fields, none for a labelled image set)
    if not params.common.caption_fields:
        raise ConfigError("common.caption_fields: at least one caption field is needed")
    check_names(params.eval_data, params.evaluate.eval_sets)  # evaluate names sets that exist
    return params


# Where a run is logged does not change what it makes: these keys stay out of config hashes.
_NOT_HASHED = {"tracking", "tracking_uri", "experiment"}


def config_hash(*configs: Any) -> str:
    """Stable short hash of one or more configs (what a stage's outputs depend on).

    Tracking settings of ``CommonConfig`` are left out, so switching MLflow on or off does not
    change the fingerprint that later stages record.
    """
    dicts = [
        {k: v for k, v in to_dict(c).items() if k not in _NOT_HASHED}
        if isinstance(c, CommonConfig) else to_dict(c)
        for c in configs
    ]
    text = json.dumps(dicts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sections(stage: str, common: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any]:
    """Validate one stage's section plus ``common`` given as plain dicts (the KFP path).

    Returns:
        ``(stage_config, common_config)``, checked exactly like a params file.
    """
    params = from_dict(Params, {"common": _whole_floats_to_int(common), stage: _whole_floats_to_int(config)})
    return params.section(stage), params.common


def _whole_floats_to_int(value: Any) -> Any:
    """KFP passes dict parameters as protobuf Structs, where every number is a double (``0.0``).

    Whole numbers become ints again; float fields accept ints, so nothing is lost.
    """
    if isinstance(value, dict):
        return {k: _whole_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_to_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
