"""Config schema: every shipped params file validates; bad keys and types are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2clip.config import (
    ConfigError,
    Params,
    SyntheticSource,
    WebDatasetSource,
    apply_overrides,
    config_hash,
    from_dict,
    load_params,
    load_sections,
)

REPO = Path(__file__).resolve().parents[2]
PARAM_FILES = sorted([REPO / "params.yaml", *(REPO / "params").glob("*.yaml")])


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_in_the_repo_validates(path):
    params = load_params(path)
    assert isinstance(params, Params)
    # round trip: dict -> Params -> dict is stable (what KFP receives is what DVC used)
    assert from_dict(Params, params.to_dict()) == params


def test_defaults_without_a_file():
    params = load_params(None)
    assert params.common.caption_fields == ("short", "dense")
    assert isinstance(params.prepare_data.sources[0], SyntheticSource)


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare_data.shard_size=abc", "prepare_data.shard_size: expected int, got 'abc'"),
        ("prepare_data.nope=1", "unknown key prepare_data.nope"),
        ("nosuchsection.x=1", "unknown key nosuchsection"),
        ("common.seed=1.5", "common.seed: expected int, got 1.5"),
        ("common.tracking=maybe", "common.tracking: expected bool"),
        ("prepare_data.sources.0.count=x", "prepare_data.sources[0].count: expected int"),
        ("prepare_data.sources.0.kind=video", "prepare_data.sources[0].kind: must be one of"),
        ("prepare_data.val_fraction=1.5", "prepare_data.val_fraction: must be in [0, 1)"),
        ("prepare_data.validation.min_captions=two", "prepare_data.validation.min_captions"),
    ],
)
def test_bad_values_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", [override])
    assert message in str(err.value)


def test_overrides_are_typed_and_reach_nested_lists():
    params = load_params(
        REPO / "params.yaml",
        ["prepare_data.shard_size=7", "prepare_data.val_fraction=0.5",
         "prepare_data.sources.0.count=3", "common.caption_fields=[a, b, c]"],
    )
    assert params.prepare_data.shard_size == 7
    assert params.prepare_data.val_fraction == 0.5
    assert params.prepare_data.sources[0].count == 3
    assert params.common.caption_fields == ("a", "b", "c")


def test_int_is_accepted_for_float_but_not_bool_for_int():
    assert load_params(None, ["prepare_data.val_fraction=0"]).prepare_data.val_fraction == 0.0
    with pytest.raises(ConfigError, match="expected int"):
        load_params(None, ["prepare_data.shard_size=true"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["shard_size"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"prepare_data": {"sources": [{}]}}, ["prepare_data.sources.3.count=1"])


def test_source_union_is_chosen_by_kind():
    params = from_dict(Params, {"prepare_data": {"sources": [
        {"kind": "webdataset", "name": "cc3m", "urls": "s3://b/{0..3}.tar",
         "caption_fields": {"short": "json:shortSV_captions"}},
    ]}})
    src = params.prepare_data.sources[0]
    assert isinstance(src, WebDatasetSource) and src.caption_fields == {"short": "json:shortSV_captions"}
    with pytest.raises(ConfigError, match="with 'kind'"):
        from_dict(Params, {"prepare_data": {"sources": [{"name": "x"}]}})


def test_duplicate_source_names_and_bad_caption_fields_are_rejected():
    with pytest.raises(ConfigError, match="source names must be unique"):
        from_dict(Params, {"prepare_data": {"sources": [{"kind": "synthetic"}, {"kind": "synthetic"}]}})
    with pytest.raises(ConfigError, match="duplicate names"):
        load_params(None, ["common.caption_fields=[a, a]"])


def test_load_sections_is_the_kfp_path_and_checks_the_same_way():
    params = load_params(REPO / "params.yaml")
    as_json = json.loads(json.dumps(params.to_dict()))  # what a KFP dict parameter carries
    cfg, common = load_sections("prepare_data", as_json["common"], as_json["prepare_data"])
    assert cfg == params.prepare_data and common == params.common
    with pytest.raises(ConfigError, match="unknown key prepare_data.bogus"):
        load_sections("prepare_data", {}, {"bogus": 1})


def test_config_hash_changes_with_any_value():
    a = load_params(REPO / "params.yaml")
    b = load_params(REPO / "params.yaml", ["prepare_data.jpeg_quality=80"])
    assert config_hash(a.common, a.prepare_data) == config_hash(a.common, a.prepare_data)
    assert config_hash(a.common, a.prepare_data) != config_hash(b.common, b.prepare_data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("common: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(bad)


def test_config_hash_ignores_where_runs_are_logged():
    a = load_params(None)
    b = load_params(None, ["common.tracking=false", "common.tracking_uri=sqlite:///x.db",
                           "common.experiment=other"])
    assert config_hash(a.common, a.prepare_data) == config_hash(b.common, b.prepare_data)


def test_kfp_struct_numbers_come_back_as_ints():
    """KFP dict parameters are protobuf Structs: every number arrives as a double."""
    cfg, common = load_sections("prepare_data", {"seed": 3.0}, {"shard_size": 1e8, "val_fraction": 0.0})
    assert common.seed == 3 and isinstance(common.seed, int)
    assert cfg.shard_size == 100_000_000 and cfg.val_fraction == 0.0
    with pytest.raises(ConfigError, match="common.seed: expected int, got 1.5"):
        load_sections("prepare_data", {"seed": 1.5}, {})


def test_every_optional_field_defaults_to_none():
    """pipelines.llm2clip_pipeline drops null values (KFP cannot carry them): that is only
    lossless while every optional field's default is None."""
    import dataclasses
    import types
    import typing

    from llm2clip import config as cfgmod

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
                assert f.default is None, f"{cls.__name__}.{f.name}"
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    walk(arg)

    walk(cfgmod.Params)
