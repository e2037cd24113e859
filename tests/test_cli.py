"""The one CLI: built from the stage table, clear config errors, the same run() as KFP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.cli import build_parser, main
from llm2clip.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_registered_stage():
    out = subprocess.run([sys.executable, "-m", "llm2clip", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    for name in STAGES:
        assert name in out


def test_every_stage_gets_its_input_and_output_flags():
    parser = build_parser()
    for spec in STAGES.values():
        sub = parser._subparsers._group_actions[0].choices[spec.name]
        flags = {opt for action in sub._actions for opt in action.option_strings}
        for name in spec.inputs + spec.outputs:
            assert f"--{name.replace('_', '-')}" in flags


def test_config_error_exits_2_and_names_the_key(tmp_path, caplog):
    code = main(["prepare_data", "--params", str(REPO / "params.yaml"),
                 "--set", "prepare_data.shard_sise=3", "--data", str(tmp_path / "out")])
    assert code == 2
    assert "unknown key prepare_data.shard_sise" in caplog.text
    assert not (tmp_path / "out").exists()


def test_params_and_json_sections_are_exclusive(tmp_path, caplog):
    code = main(["prepare_data", "--params", str(REPO / "params.yaml"), "--config-json", "{}",
                 "--data", str(tmp_path)])
    assert code == 2 and "either --params" in caplog.text


def test_missing_output_flag_is_an_argparse_error():
    with pytest.raises(SystemExit) as err:
        main(["prepare_data", "--params", str(REPO / "params.yaml")])
    assert err.value.code == 2


def test_prepare_data_runs_from_json_sections_like_kfp(tmp_path):
    """--common-json/--config-json is how a container gets its config; same result as --params."""
    common = {"tracking": False}
    config = {"sources": [{"kind": "synthetic", "name": "s", "count": 24, "image_size": 64}],
              "shard_size": 10, "val_fraction": 0.25}
    out = tmp_path / "data"
    code = main(["prepare_data", "--common-json", json.dumps(common),
                 "--config-json", json.dumps(config), "--data", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 24
