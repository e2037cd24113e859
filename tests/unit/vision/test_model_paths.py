"""A saved model works outside the folder it was trained in; a missing encoder path never asks the hub.

Regression tests of issue 11, defect 6: the exported model stored the caption encoder as a
relative path, and loaded elsewhere ``encode_text`` took it for a hub id and retried the
network for a minute.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from vision_tiny import TINY_VISION

from llm2clip.clip_model import encode_text
from llm2clip.vision.model import CONFIG_FILE, LLM2CLIPModel

_spec = importlib.util.spec_from_file_location(
    "tiny_assets", Path(__file__).resolve().parents[1] / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

LLM_DIM = 32  # the tiny Llama's hidden size
TEXTS = ["a red circle", "two blue boats"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return tiny_assets.make_llama(tmp_path_factory.mktemp("run") / "models" / "caption_encoder")


def build(caption_encoder: str, fingerprint: str | None = "f" * 64) -> LLM2CLIPModel:
    torch.manual_seed(0)
    return LLM2CLIPModel.build({"kind": "clip", "config": TINY_VISION}, llm_dim=LLM_DIM, embed_dim=16,
                               caption_encoder=caption_encoder, caption_encoder_fingerprint=fingerprint)


def no_hub(monkeypatch) -> list[str]:
    """Record every model load that reaches transformers (none may happen for a missing path)."""
    import llm2clip.text.encoder as encoder_module

    calls: list[str] = []

    def refuse(source, *args, **kwargs):
        calls.append(source)
        raise AssertionError(f"{source} went to transformers")

    monkeypatch.setattr(encoder_module, "load_model", refuse)
    monkeypatch.setattr(encoder_module, "load_tokenizer", refuse)
    return calls


def test_relative_encoder_path_is_saved_absolute_and_loads_from_elsewhere(encoder_dir, tmp_path, monkeypatch):
    run = encoder_dir.parents[1]
    monkeypatch.chdir(run)  # where training ran: the encoder is "models/caption_encoder" here
    model = build("models/caption_encoder")
    expected = encode_text(model, TEXTS)
    model.save_pretrained(run / "models" / "vision_model")
    saved = json.loads((run / "models" / "vision_model" / CONFIG_FILE).read_text())["caption_encoder"]
    assert saved["path"] == str(encoder_dir.absolute())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = LLM2CLIPModel.from_pretrained(run / "models" / "vision_model")
    torch.testing.assert_close(encode_text(loaded, TEXTS), expected, atol=1e-6, rtol=0)


def test_old_relative_path_is_found_next_to_the_model(encoder_dir, tmp_path, monkeypatch):
    run = encoder_dir.parents[1]
    model_dir = build(str(encoder_dir)).save_pretrained(run / "models" / "old_export")
    config_path = model_dir / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["caption_encoder"]["path"] = "../caption_encoder"  # relative to the model dir
    config_path.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    loaded = LLM2CLIPModel.from_pretrained(model_dir)
    assert loaded.caption_encoder == str(encoder_dir.absolute())
    assert encode_text(loaded, TEXTS).shape == (2, 16)


@pytest.mark.parametrize("saved_path", ["models/caption_encoder", "/gone/models/caption_encoder",
                                        "./caption_encoder"])
def test_missing_saved_encoder_fails_at_once_without_the_hub(saved_path, tmp_path, monkeypatch):
    model_dir = build("unused").save_pretrained(tmp_path / "vision_model")
    config_path = model_dir / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["caption_encoder"]["path"] = saved_path  # what an export trained elsewhere holds
    config_path.write_text(json.dumps(config))
    calls = no_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online, a missing path is not a hub id
    monkeypatch.chdir(tmp_path)
    loaded = LLM2CLIPModel.from_pretrained(model_dir)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="does not exist.*saved in .*pass caption_encoder="):
        encode_text(loaded, TEXTS)
    assert time.monotonic() - started < 5 and calls == []


def test_an_explicit_missing_encoder_dir_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()  # "models/encoder" can only be a path here
    monkeypatch.chdir(tmp_path)
    calls = no_hub(monkeypatch)
    for spec in ("models/encoder", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            encode_text(build(spec, fingerprint=None), TEXTS)
    assert calls == []


def test_hub_ids_and_package_specs_are_kept_as_they_are(tmp_path):
    for spec in ("org/encoder", "pkg://some_package/model"):
        model_dir = build(spec, fingerprint=None).save_pretrained(tmp_path / spec.replace("/", "_"))
        assert json.loads((model_dir / CONFIG_FILE).read_text())["caption_encoder"]["path"] == spec
        assert LLM2CLIPModel.from_pretrained(model_dir).caption_encoder == spec
