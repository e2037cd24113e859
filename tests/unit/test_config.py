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
from llm2clip.config.loader import deep_merge, read_params_mapping

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


# ------------------------------------------------------------------------------ extends: + profiles

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_deep_merges_over_the_base_and_overrides_apply_after(tmp_path, monkeypatch):
    _write(tmp_path / "base" / "root.yaml", """
common: {seed: 1, caption_fields: [short, dense, extra]}
prepare_data:
  sources: [{kind: synthetic, name: a, count: 10}, {kind: emoji, name: b}]
  validation: {min_image_side: 40, max_caption_chars: 900}
train_vision: {lr: 0.01, tower_config: {hidden_size: 32, num_hidden_layers: 2}}
""")
    _write(tmp_path / "base" / "mid.yaml", "extends: root.yaml\ncommon: {seed: 2}\ntrain_vision: {lr: 0.02}\n")
    child = _write(tmp_path / "profiles" / "child.yaml", """
extends: ../base/mid.yaml    # relative to this file, not to the working directory
common: {caption_fields: [short]}
prepare_data:
  sources: [{kind: synthetic, name: c, count: 3}]
  validation: {min_image_side: 50}
train_vision: {tower_config: {num_hidden_layers: 4}}
""")
    monkeypatch.chdir(tmp_path / "base")  # a working directory where "../base/mid.yaml" is wrong
    params = load_params(child)
    assert params.common.seed == 2  # chain: root <- mid <- child
    assert params.common.caption_fields == ("short",)  # lists are replaced, not merged
    assert [s.name for s in params.prepare_data.sources] == ["c"]
    assert params.prepare_data.validation.min_image_side == 50  # mappings merge key by key
    assert params.prepare_data.validation.max_caption_chars == 900
    assert params.train_vision.lr == 0.02
    assert params.train_vision.tower_config == {"hidden_size": 32, "num_hidden_layers": 4}
    overridden = load_params(child, ["common.seed=7", "train_vision.lr=0.5"])
    assert overridden.common.seed == 7 and overridden.train_vision.lr == 0.5
    assert "extends" not in read_params_mapping(child)


def test_extends_cycles_missing_bases_and_bad_values_are_one_clear_error(tmp_path):
    a = _write(tmp_path / "a.yaml", "extends: b.yaml\ncommon: {seed: 1}\n")
    _write(tmp_path / "b.yaml", "extends: sub/c.yaml\n")
    _write(tmp_path / "sub" / "c.yaml", "extends: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"extends cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_params(a)
    itself = _write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle"):
        load_params(itself)
    orphan = _write(tmp_path / "orphan.yaml", "extends: nope/base.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml: extends: base params file not found: .*nope/base\.yaml"):
        load_params(orphan)
    for value in ("[a.yaml]", "''", "3"):
        bad = _write(tmp_path / "bad.yaml", f"extends: {value}\n")
        with pytest.raises(ConfigError, match="extends: expected the path of a params file"):
            load_params(bad)
    _write(tmp_path / "broken.yaml", "common: [unclosed")
    _write(tmp_path / "on_broken.yaml", "extends: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_params(tmp_path / "on_broken.yaml")
    with pytest.raises(ConfigError, match="unknown key extends"):  # only a params file can extend
        from_dict(Params, {"extends": "params.yaml"})


def test_deep_merge_leaves_its_inputs_alone():
    base = {"a": {"b": [1, 2], "c": 1}, "d": 1}
    over = {"a": {"b": [3]}, "d": None}
    assert deep_merge(base, over) == {"a": {"b": [3], "c": 1}, "d": None}
    assert base == {"a": {"b": [1, 2], "c": 1}, "d": 1} and over == {"a": {"b": [3]}, "d": None}


PAPER_PROFILES = sorted((REPO / "params").glob("paper-*.yaml"))


def _unset_keys(cls: type, raw: dict, where: str) -> list[str]:
    """Fields of dataclass ``cls`` that the raw mapping ``raw`` does not list, recursively (nested
    sections, and each item of a list of dataclasses, by its ``kind`` when it is a union)."""
    import dataclasses
    import types
    import typing

    def classes(tp):
        if dataclasses.is_dataclass(tp):
            return [tp]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return []

    hints, unset = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            unset.append(key)
            continue
        tp, value = hints[f.name], raw[f.name]
        if classes(tp) and isinstance(value, dict):
            unset += _unset_keys(classes(tp)[0], value, key)
        elif typing.get_origin(tp) is dict and classes(typing.get_args(tp)[1]) and isinstance(value, dict):
            for name, item in value.items():  # e.g. each eval set of eval_data
                unset += _unset_keys(classes(typing.get_args(tp)[1])[0], item, f"{key}.{name}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            options = classes(typing.get_args(tp)[0])
            for i, item in enumerate(value):
                match = [c for c in options if len(options) == 1 or
                         any(g.name == "kind" and g.default == item.get("kind") for g in dataclasses.fields(c))]
                if match and isinstance(item, dict):
                    unset += _unset_keys(match[0], item, f"{key}[{i}]")
    return unset


def test_there_are_paper_profiles():
    assert {p.name for p in PAPER_PROFILES} >= {"paper-openai-l14-336.yaml", "paper-eva02-l14-336.yaml"}


@pytest.mark.parametrize("path", PAPER_PROFILES, ids=lambda p: p.name)
def test_paper_profiles_set_every_key_no_silent_demo_defaults(path):
    """A key a paper profile leaves out takes the small CPU demo's default: every field of common
    and of every stage section must be written (after ``extends:``), even where the value is the
    default (then it is a decision, with a comment in the YAML)."""
    raw = read_params_mapping(path)
    unset = _unset_keys(Params, raw, "")
    assert not unset, f"{path.name} leaves these keys at their demo defaults: {unset}"


@pytest.mark.parametrize("path", PAPER_PROFILES, ids=lambda p: p.name)
def test_paper_profiles_embed_captions_of_512_tokens(path):
    params = load_params(path)
    assert params.caption_contrastive.max_length == 512  # reference max_seq_length / LLM2Vec max_length
    if hasattr(params.embed_captions, "max_length"):
        assert params.embed_captions.max_length == 512
    assert params.train_vision.embed_dim == 1280 and params.train_vision.image_size == 336
