"""``llm2clip import``: tiny checkpoints written in the released layouts (random weights) import
into our artifacts that compute what the reference computes, refuse any other layout with one
clear error, and feed evaluate and train_vision.

The released layouts (docs/released-checkpoints.md):

- ``microsoft/LLM2CLIP-Openai-*``: HF ``config.json`` (``CLIPConfig``; ``save_pretrained`` writes only
  the non-default ``vision_config`` keys) + ``model.safetensors`` with ``vision_model.*`` (HF
  ``CLIPVisionTransformer``), ``visual_projection.weight`` (no bias), ``text_adapter.adaptor.*`` (the
  reference ``TextProj`` stack) and a 0-d ``logit_scale``; remote code files (never run).
- ``microsoft/LLM2CLIP-EVA02-*``: the ``eva_clip`` ``CustomCLIP`` state dict (``visual.*`` with
  ``visual.head``, ``text.text_adaptor.*``, ``logit_scale``) as a ``.pt``.
- ``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned``: a ``LlamaModel`` (``architectures:
  LlamaEncoderModel`` + ``auto_map`` to McGill's remote code) + a Llama-3 tokenizer.

The reference computations are re-written here from the reference code's structure, not taken from
ours: HF ``CLIPVisionTransformer`` -> ``visual_projection`` -> normalize; ``TextProj`` (L2-normalised
input, pre-LN residual blocks, LN, Linear) -> normalize; ``logit_scale.exp() * img @ txt.T``; llm2vec's
Llama-3 wrapper + bidirectional attention + mean over the caption's last tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llm2clip.cli import IMPORT_KINDS, main
from llm2clip.contracts import read_manifest
from llm2clip.importers import KINDS, import_checkpoint
from llm2clip.io import StageError, sha256_file
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.vision.model import LLM2CLIPModel

_spec = importlib.util.spec_from_file_location(
    "import_tiny_assets", Path(__file__).resolve().parent / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

LLM = 32  # tiny caption-encoder width = the adapter's input width
EMBED = 16  # "1280"
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8, "projection_dim": EMBED}
LOGIT_SCALE = math.log(50.0)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
HEADER, EOT = "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"
CAPTIONS = ["a red circle", "two blue square and a big tree next to the house", "a cat ", "a photo of a dog"]


# ------------------------------------------------------------------------------ released layouts


def _adapter_state(prefix: str, gen: torch.Generator, blocks: int = 4) -> dict[str, torch.Tensor]:
    """Random ``TextProj`` weights (``<prefix>.<i>.fn.{0,3}``, ``.ln``; LN; Linear) at non-trivial scales."""
    def rand(*shape, scale=0.2, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    state = {}
    for i in range(blocks):
        state |= {f"{prefix}.{i}.fn.0.weight": rand(2 * LLM, LLM), f"{prefix}.{i}.fn.0.bias": rand(2 * LLM),
                  f"{prefix}.{i}.fn.3.weight": rand(LLM, 2 * LLM), f"{prefix}.{i}.fn.3.bias": rand(LLM),
                  f"{prefix}.{i}.ln.weight": rand(LLM, shift=1.0), f"{prefix}.{i}.ln.bias": rand(LLM)}
    state |= {f"{prefix}.{blocks}.weight": rand(LLM, shift=1.0), f"{prefix}.{blocks}.bias": rand(LLM),
              f"{prefix}.{blocks + 1}.weight": rand(EMBED, LLM), f"{prefix}.{blocks + 1}.bias": rand(EMBED)}
    return state


def openai_release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a released LLM2CLIP-Openai model.safetensors (tiny, random)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    with torch.no_grad():  # LayerNorms away from their (1, 0) init, so a swapped pair would show
        for name, p in tower.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}  # HF 4.x names
    state["visual_projection.weight"] = torch.randn(EMBED, VISION["hidden_size"], generator=gen) * 0.2
    state |= _adapter_state("text_adapter.adaptor", gen)
    state["logit_scale"] = torch.tensor(LOGIT_SCALE)  # 0-d, as nn.Parameter(torch.tensor(...))
    return {k: v.contiguous() for k, v in state.items()}


def openai_release_config() -> dict:
    """config.json as the release's save_pretrained (transformers 4.46) writes it: the CLIPConfig,
    vision_config with only its non-default keys, the (unused) CLIP text_config, auto_map."""
    defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "image_size": 224, "patch_size": 32, "projection_dim": 512}
    return {
        "_name_or_path": "microsoft/LLM2CLIP-Openai-L-14-336", "architectures": ["LLM2CLIPModel"],
        "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_llm2clip.LLM2CLIPModel"},
        "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
        "projection_dim": EMBED, "torch_dtype": "float32", "transformers_version": "4.46.0",
        "text_config": {"hidden_size": 768, "model_type": "clip_text_model"},
        "vision_config": {**{k: v for k, v in VISION.items() if defaults.get(k) != v},
                          "dropout": 0.0, "model_type": "clip_vision_model"},
    }


def write_openai_release(root: Path, state: dict | None = None, config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(openai_release_state() if state is None else state, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(openai_release_config() if config is None else config))
    (root / "modeling_llm2clip.py").write_text("raise SystemExit('remote code must never run')\n")
    (root / "README.md").write_text("# LLM2CLIP-Openai (tiny test copy)\n")
    return root


def llama3_tokenizer(directory: Path):
    """A word-level fast tokenizer with the Llama-3 chat tokens; adds ``<|begin_of_text|>`` like Llama-3's."""
    from tokenizers import AddedToken, Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*LLAMA3_SPECIALS, "<unk>", "user", ",", "."] + tiny_assets.WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def write_llama_release(root: Path, seed: int = 0) -> Path:
    """A tiny LLM2CLIP-Llama-3-*-CC-Finetuned snapshot: LlamaEncoderModel config + auto_map, safetensors,
    Llama-3-style tokenizer, the remote code file (never run), a README."""
    from transformers import LlamaConfig, LlamaModel

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = llama3_tokenizer(root)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=LLM, intermediate_size=2 * LLM,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=4, tie_word_embeddings=False)
    LlamaModel(config).save_pretrained(root)
    data = json.loads((root / "config.json").read_text())
    data |= {"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "architectures": ["LlamaEncoderModel"],
             "auto_map": {"AutoModel": "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp--"
                                       "modeling_llama_encoder.LlamaEncoderModel"}}
    (root / "config.json").write_text(json.dumps(data))
    (root / "modeling_llama_encoder.py").write_text("raise SystemExit('remote code must never run')\n")
    (root / "README.md").write_text("# LLM2CLIP CC-finetuned Llama (tiny test copy)\n")
    return root


# ------------------------------------------------------------------------- reference computations


def ref_image_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """HF ``CLIPVisionTransformer`` (pre-LN ViT, quick-GELU, post-LN CLS) -> ``visual_projection`` -> normalize."""
    def w(name):
        return state[f"vision_model.{name}"]

    def ln(x, name, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], w(f"{name}.weight"), w(f"{name}.bias"), eps)

    def lin(x, name):
        return F.linear(x, w(f"{name}.weight"), w(f"{name}.bias"))

    x = F.conv2d(pixels, w("embeddings.patch_embedding.weight"), stride=VISION["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([w("embeddings.class_embedding").expand(x.shape[0], 1, -1), x], 1)
    x = ln(x + w("embeddings.position_embedding.weight"), "pre_layrnorm")
    heads = VISION["num_attention_heads"]
    for i in range(VISION["num_hidden_layers"]):
        p = f"encoder.layers.{i}"
        h = ln(x, f"{p}.layer_norm1")
        q, k, v = (lin(h, f"{p}.self_attn.{n}_proj").unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        x = x + lin(att.transpose(1, 2).flatten(2), f"{p}.self_attn.out_proj")
        h = lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), f"{p}.mlp.fc2")  # quick_gelu
    pooled = ln(x[:, 0], "post_layernorm")
    return F.normalize(pooled @ state["visual_projection.weight"].T, dim=-1)


def ref_text_features(state: dict[str, torch.Tensor], emb: torch.Tensor, prefix: str) -> torch.Tensor:
    """Reference ``TextProj.forward`` (l2_norm=True) -> normalize."""
    x = F.normalize(emb, p=2, dim=-1)
    i = 0
    while f"{prefix}.{i}.fn.0.weight" in state:
        s = {k: state[f"{prefix}.{i}.{k}"] for k in ("ln.weight", "ln.bias", "fn.0.weight", "fn.0.bias",
                                                      "fn.3.weight", "fn.3.bias")}
        h = F.layer_norm(x, x.shape[-1:], s["ln.weight"], s["ln.bias"])
        x = x + F.linear(F.gelu(F.linear(h, s["fn.0.weight"], s["fn.0.bias"])), s["fn.3.weight"], s["fn.3.bias"])
        i += 1
    x = F.layer_norm(x, x.shape[-1:], state[f"{prefix}.{i}.weight"], state[f"{prefix}.{i}.bias"])
    return F.normalize(F.linear(x, state[f"{prefix}.{i + 1}.weight"], state[f"{prefix}.{i + 1}.bias"]), dim=-1)


def ref_caption_embeddings(src: Path, captions: list[str]) -> torch.Tensor:
    """llm2vec as ``extract_embedding.py`` runs it: Llama-3 user turn (stripped caption), BOS from the
    tokenizer, bidirectional attention (LlamaEncoderModel), mean over the last ``len(caption + eot)`` tokens."""
    from transformers import AutoTokenizer, LlamaModel

    tok = AutoTokenizer.from_pretrained(src)
    model = LlamaModel.from_pretrained(src, attn_implementation="eager", dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for caption in captions:
            ids = torch.tensor([tok(HEADER + caption.strip() + EOT)["input_ids"]])
            n = len(tok(caption.strip() + EOT, add_special_tokens=False)["input_ids"])
            full = torch.zeros(1, 1, ids.shape[1], ids.shape[1])  # every token sees every token
            out.append(model(input_ids=ids, attention_mask=full).last_hidden_state[0, -n:].mean(0))
    return torch.stack(out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def parity(out: dict[str, torch.Tensor], img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor
           ) -> dict[str, float]:
    """Max abs differences, ours vs the reference: features, cosine similarities, temperature, logits
    (``logit_scale.exp() * img @ txt.T``; its fp32 rounding grows with the scale, so it is also given
    relative to the scale)."""
    ours = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    ref = logit_scale.exp() * img @ txt.T
    scale = float(logit_scale.exp())
    return {"image": max_diff(out["image_features"], img), "text": max_diff(out["text_features"], txt),
            "similarity": max_diff(out["image_features"] @ out["text_features"].T, img @ txt.T),
            "logit_scale": max_diff(out["logit_scale"], logit_scale.exp()),
            "logits": max_diff(ours, ref), "logits/scale": max_diff(ours, ref) / scale}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny release snapshots and their imports (the import under test runs once here)."""
    root = tmp_path_factory.mktemp("released")
    openai_src = write_openai_release(root / "LLM2CLIP-Openai-L-14-336")
    llama_src = write_llama_release(root / "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")
    encoder = root / "imported" / "caption_encoder"
    encoder_result = import_checkpoint("caption-encoder", str(llama_src), str(encoder))
    vision = root / "imported" / "vision"
    vision_result = import_checkpoint("openai-vit", str(openai_src), str(vision), caption_encoder=str(encoder))
    return {"root": root, "openai_src": openai_src, "llama_src": llama_src, "encoder": encoder,
            "vision": vision, "encoder_result": encoder_result, "vision_result": vision_result}


# --------------------------------------------------------------------------------- openai-vit


def test_openai_vit_forward_equals_reference_forward(released):
    state = load_file(str(released["openai_src"] / "model.safetensors"))
    model = LLM2CLIPModel.from_pretrained(released["vision"])
    torch.manual_seed(1)
    pixels, emb = torch.randn(3, 3, 32, 32), torch.randn(4, LLM) * 7.0
    with torch.no_grad():
        out = model(pixels, emb)
        img, txt = ref_image_features(state, pixels), ref_text_features(state, emb, "text_adapter.adaptor")
        diffs = parity(out, img, txt, state["logit_scale"])
    print(f"openai-vit parity (max abs diff): {diffs}")
    assert max(v for k, v in diffs.items() if k != "logits") < 1e-5 and diffs["logits/scale"] < 1e-6, diffs
    assert (img @ txt.T).abs().max() > 0.1  # the similarities are not trivially small
    # the HF class itself on the released vision_model.* weights: the same pooled features
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    hf.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")})
    with torch.no_grad():
        hf_img = F.normalize(hf(pixel_values=pixels).pooler_output @ state["visual_projection.weight"].T, dim=-1)
    assert max_diff(hf_img, img) < 1e-5


def test_openai_vit_output_is_a_model_dir_with_provenance(released):
    vision, src = released["vision"], released["openai_src"]
    result = released["vision_result"]
    assert result.filled == {"head.bias": result.filled["head.bias"]} and "zeros" in result.filled["head.bias"]
    assert result.dropped == {}
    manifest = read_manifest("train_vision", vision)  # the contract evaluate/register read
    record = manifest["imported_from"]
    assert record["kind"] == "openai-vit" and record["source"] == str(src.resolve())
    assert record["files"] == {n: sha256_file(src / n) for n in ("config.json", "model.safetensors")}
    assert record["release"] == "microsoft/LLM2CLIP-Openai-L-14-336"
    assert "text_config" in record["config_ignored"]["top_level"]
    assert manifest["files"]["model.safetensors"] == sha256_file(vision / "model.safetensors")
    config = json.loads((vision / "llm2clip_config.json").read_text())
    assert config["tower"]["spec"]["kind"] == "clip" and config["tower"]["spec"]["config"]["hidden_act"] == "quick_gelu"
    assert config["embed_dim"] == EMBED and config["llm_embedding_dim"] == LLM and config["loss"] == "clip"
    assert config["adapter"] == {"num_blocks": 4, "expansion": 2, "l2_normalize_input": True}
    assert math.isclose(config["logit_scale"], LOGIT_SCALE, rel_tol=1e-6)
    assert config["caption_encoder"]["path"] == str(released["encoder"].resolve())
    model = LLM2CLIPModel.from_pretrained(vision)
    assert torch.equal(model.head.bias, torch.zeros(EMBED))
    assert model.preprocess.image_size == 32 and model.preprocess.mean[0] == pytest.approx(0.48145466)
    assert not (vision / "modeling_llm2clip.py").exists()


def test_openai_vit_takes_a_projection_bias_and_a_pickle_free_bin(tmp_path):
    state = openai_release_state(seed=3)
    state["visual_projection.bias"] = torch.randn(EMBED)
    src = write_openai_release(tmp_path / "src", state)
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")  # read with weights_only=True
    result = import_checkpoint("openai-vit", str(src), str(tmp_path / "out"))
    assert result.filled == {}
    model = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    assert torch.equal(model.head.bias.detach(), state["visual_projection.bias"])
    assert torch.equal(model.head.weight.detach(), state["visual_projection.weight"])


@pytest.mark.parametrize("change, expected", [
    ("missing", "target keys nothing fills [adapter.text_adaptor.5.bias]"),
    ("extra", "source keys no rule takes [text_model.embeddings.token_embedding.weight]"),
    ("shape", "wrong shapes [visual_projection.weight (16, 31) -> head.weight (16, 32)]"),
])
def test_openai_vit_wrong_layout_is_one_clear_error(tmp_path, change, expected):
    state = openai_release_state()
    if change == "missing":
        del state["text_adapter.adaptor.5.bias"]
    elif change == "extra":
        state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    else:
        state["visual_projection.weight"] = torch.zeros(EMBED, 31)
    src = write_openai_release(tmp_path / "src", state)
    with pytest.raises(StageError) as err:
        import_checkpoint("openai-vit", str(src), str(tmp_path / "out"))
    message = str(err.value)
    assert "\n" not in message and "is not in the released layout" in message and expected in message, message
    assert not (tmp_path / "out").exists()  # a refused source writes nothing


def test_openai_vit_config_that_contradicts_the_weights_is_refused(tmp_path):
    config = openai_release_config()
    config["vision_config"]["image_size"] = 64
    src = write_openai_release(tmp_path / "src", config=config)
    with pytest.raises(StageError, match=r"vision_config does not match the weights: image_size=64 \(weights: 32\)"):
        import_checkpoint("openai-vit", str(src), str(tmp_path / "out"))


def test_output_dir_is_never_cleared_unless_a_previous_import(released, tmp_path):
    src = released["openai_src"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match="not a previous import"):
        import_checkpoint("openai-vit", str(src), str(other), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "again"
    import_checkpoint("openai-vit", str(src), str(out))
    with pytest.raises(StageError, match="--overwrite"):
        import_checkpoint("openai-vit", str(src), str(out))
    import_checkpoint("openai-vit", str(src), str(out), overwrite=True)
    assert read_manifest("train_vision", out)["imported_from"]["kind"] == "openai-vit"


def test_a_failed_write_leaves_an_empty_dir_that_a_rerun_takes(released, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def disk_full(self, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LLM2CLIPModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        import_checkpoint("openai-vit", str(released["openai_src"]), str(out))
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    import_checkpoint("openai-vit", str(released["openai_src"]), str(out))
    assert read_manifest("train_vision", out)["imported_from"]["kind"] == "openai-vit"


# ----------------------------------------------------------------------------- caption-encoder


def test_caption_encoder_embeds_as_the_reference(released):
    encoder = CaptionEncoder.from_pretrained(released["encoder"], device="cpu", dtype=torch.float32)
    ours = encoder.encode(CAPTIONS, batch_size=3, normalize=False)  # batched: padding + position ids
    ref = ref_caption_embeddings(released["llama_src"], CAPTIONS)
    diff = max_diff(ours, ref)
    print(f"caption-encoder parity (max abs diff over {len(CAPTIONS)} captions): {diff:.2e}")
    assert diff < 1e-5
    assert encoder.is_decoder and encoder.settings.bidirectional
    # with the query instruction, only the caption (and eot) is pooled: instruction tokens only
    # change the context, as llm2vec's _skip_instruction
    query = encoder.encode(CAPTIONS[:1], normalize=False, instruction=encoder.settings.query_instruction)
    assert max_diff(query, ours[:1]) > 1e-4


def test_caption_encoder_dir_settings_manifest_and_lineage(released):
    from llm2clip.importers.caption_encoder import SETTINGS, SETTINGS_SOURCES
    from llm2clip.lineage import check_caption_encoder_dir

    enc, src = released["encoder"], released["llama_src"]
    settings = EncoderSettings.from_dict(json.loads((enc / SETTINGS_FILE).read_text()))
    assert settings.prompt_template == "<|start_header_id|>user<|end_header_id|>\n\n{instruction}{text}<|eot_id|>"
    assert (settings.pooling, settings.bidirectional, settings.max_length, settings.instruction) == ("mean", True,
                                                                                                  512, "")
    assert settings.query_instruction == "Given a sentence, retrieve a detailed relevant sentence; "
    assert settings == EncoderSettings(**{**SETTINGS.to_dict(), "base_model": settings.base_model})
    assert set(SETTINGS_SOURCES) == set(SETTINGS.to_dict())  # every setting says where it came from
    manifest = read_manifest("caption_contrastive", enc)
    check_caption_encoder_dir(str(enc), str(enc))  # embed_captions' lineage check accepts it
    record = manifest["imported_from"]
    taken = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert set(record["files"]) == taken
    assert record["files"] == {n: sha256_file(src / n) for n in taken}
    assert record["dropped"] == {"README.md": "documentation",
                                 "modeling_llama_encoder.py": record["dropped"]["modeling_llama_encoder.py"]}
    assert manifest["files"][SETTINGS_FILE] == sha256_file(enc / SETTINGS_FILE)
    assert manifest["embedding_dim"] == LLM and manifest["settings"] == settings.to_dict()
    assert not (enc / "modeling_llama_encoder.py").exists() and not (enc / "README.md").exists()
    assert os.stat(enc / "model.safetensors").st_ino == os.stat(src / "model.safetensors").st_ino  # hard link


def test_caption_encoder_copy_mode_and_prefixed_weights(released, tmp_path):
    """A ``model.``-prefixed checkpoint with an LM head (a LlamaForCausalLM save) imports too; the
    head is dropped by name; ``--link copy`` writes separate files."""
    src = tmp_path / "src"
    write_llama_release(src)
    state = load_file(str(src / "model.safetensors"))
    state = {f"model.{k}": v for k, v in state.items()} | {"lm_head.weight": torch.zeros(3, LLM)}
    # (the LM head's shape is not checked: it is dropped before any shape is compared)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = import_checkpoint("caption-encoder", str(src), str(tmp_path / "out"), link="copy")
    assert "lm_head.weight" in result.dropped
    assert os.stat(tmp_path / "out" / "model.safetensors").st_ino != os.stat(src / "model.safetensors").st_ino
    encoder = CaptionEncoder.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32)
    assert max_diff(encoder.encode(CAPTIONS[:2], normalize=False), ref_caption_embeddings(src, CAPTIONS[:2])) < 1e-5


@pytest.mark.parametrize("change, expected", [
    ("extra", "source keys with no tensor of ours [layers.0.mlp.extra_proj.weight]"),
    ("missing", "target keys nothing fills [norm.weight]"),
    ("shape", "wrong shapes [embed_tokens.weight"),
    ("tokenizer", "lacks the Llama-3 chat tokens ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']"),
    ("pickle", "holds no safetensors weights (only ['pytorch_model.bin']: pickles are not imported)"),
])
def test_caption_encoder_wrong_layout_is_one_clear_error(tmp_path, change, expected):
    src = write_llama_release(tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    if change == "extra":
        state["layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    elif change == "missing":
        del state["norm.weight"]
    elif change == "shape":
        state["embed_tokens.weight"] = torch.zeros(5, LLM)
    if change == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (src / name).unlink()
        tiny_assets.make_tokenizer(src)
    elif change == "pickle":
        (src / "model.safetensors").unlink()
        torch.save(state, src / "pytorch_model.bin")
    else:
        save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StageError) as err:
        import_checkpoint("caption-encoder", str(src), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()  # a refused source writes nothing


# ---------------------------------------------------------------------------------------- eva02

EVA = {"width": 32, "layers": 2, "heads": 4, "patch_size": 8, "image_size": 32}
EVA_HIDDEN = int(32 * 2.6667)  # SwiGLU width int(width * mlp_ratio), mlp_ratio 2.6667 (EVA02 configs)


def eva_rope_tables(head_dim: int, grid: int, pt_grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope.py:VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=16, ft_seq_len=grid)`` buffers."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    f = torch.einsum("i,f->if", torch.arange(grid) / grid * pt_grid, freqs).repeat_interleave(2, -1)
    f = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], -1)
    return f.cos().reshape(grid * grid, -1), f.sin().reshape(grid * grid, -1)


def eva_release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The released ``LLM2CLIP-EVA02-*.pt``: the eva_clip ``CustomCLIP`` state dict (tiny, random): the
    EVA02 tower with LLM2CLIP's ``attn.q_proj.bias``/``v_proj.bias``, the shared rotary tables under
    ``visual.rope`` and every block, ``visual.head``, ``text.text_adaptor.*`` and ``logit_scale``."""
    gen = torch.Generator().manual_seed(seed)
    width, grid = EVA["width"], EVA["image_size"] // EVA["patch_size"]

    def rand(*shape, norm=False):
        return torch.randn(*shape, generator=gen) * (0.1 if norm else 0.3) + (1.0 if norm else 0.0)

    state = {"visual.patch_embed.proj.weight": rand(width, 3, EVA["patch_size"], EVA["patch_size"]),
             "visual.patch_embed.proj.bias": rand(width), "visual.cls_token": rand(1, 1, width),
             "visual.pos_embed": rand(1, grid * grid + 1, width)}
    cos, sin = eva_rope_tables(width // EVA["heads"], grid)
    state |= {"visual.rope.freqs_cos": cos, "visual.rope.freqs_sin": sin}
    for i in range(EVA["layers"]):
        b = f"visual.blocks.{i}"
        for name, shape in (("norm1", width), ("norm2", width), ("attn.inner_attn_ln", width),
                            ("mlp.ffn_ln", EVA_HIDDEN)):
            state |= {f"{b}.{name}.weight": rand(shape, norm=True), f"{b}.{name}.bias": rand(shape, norm=True) - 1}
        for name, (out, inp, bias) in {"attn.q_proj": (width, width, True), "attn.k_proj": (width, width, False),
                                       "attn.v_proj": (width, width, True), "attn.proj": (width, width, True),
                                       "mlp.w1": (EVA_HIDDEN, width, True), "mlp.w2": (EVA_HIDDEN, width, True),
                                       "mlp.w3": (width, EVA_HIDDEN, True)}.items():
            state[f"{b}.{name}.weight"] = rand(out, inp) / math.sqrt(inp) * 3
            if bias:
                state[f"{b}.{name}.bias"] = rand(out)
        state |= {f"{b}.attn.rope.freqs_cos": cos, f"{b}.attn.rope.freqs_sin": sin}
    state |= {"visual.norm.weight": rand(width, norm=True), "visual.norm.bias": rand(width, norm=True) - 1,
              "visual.head.weight": rand(EMBED, width), "visual.head.bias": rand(EMBED)}
    state |= _adapter_state("text.text_adaptor", gen)
    state["logit_scale"] = torch.tensor(LOGIT_SCALE)
    return state


def write_eva_release(root: Path, state: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.save(eva_release_state() if state is None else state, root / "LLM2CLIP-EVA02-L-14-336.pt")
    (root / "README.md").write_text("# LLM2CLIP-EVA02 (tiny test copy)\n")
    return root


def ref_eva_image_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """``EVAVisionTransformer`` (rope, subln, naive SwiGLU, CLS after ``norm``) -> ``head`` -> normalize,
    with the checkpoint's own rotary tables."""
    def v(name):
        return state[f"visual.{name}"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], v(f"{name}.weight"), v(f"{name}.bias"), 1e-6)

    def lin(x, name, bias=True):
        return F.linear(x, v(f"{name}.weight"), v(f"{name}.bias") if bias else None)

    def rope(t):  # t * cos + rotate_half(t) * sin, rotate_half: pairs (a, b) -> (-b, a)
        pairs = t.unflatten(-1, (-1, 2))
        return t * v("rope.freqs_cos") + torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2) * v(
            "rope.freqs_sin")

    x = F.conv2d(pixels, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=EVA["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token").expand(x.shape[0], -1, -1), x], 1) + v("pos_embed")
    heads = EVA["heads"]
    for i in range(EVA["layers"]):
        b = f"blocks.{i}"
        h = ln(x, f"{b}.norm1")
        q, k, val = (lin(h, f"{b}.attn.{n}_proj", n != "k").unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], 2)
        k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], 2)
        att = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), -1) @ val
        x = x + lin(ln(att.transpose(1, 2).flatten(2), f"{b}.attn.inner_attn_ln"), f"{b}.attn.proj")
        h = ln(x, f"{b}.norm2")
        x = x + lin(ln(F.silu(lin(h, f"{b}.mlp.w1")) * lin(h, f"{b}.mlp.w2"), f"{b}.mlp.ffn_ln"), f"{b}.mlp.w3")
    return F.normalize(lin(ln(x, "norm")[:, 0], "head"), dim=-1)


def test_eva02_forward_equals_reference_forward(tmp_path):
    src = write_eva_release(tmp_path / "LLM2CLIP-EVA02-L-14-336")
    result = import_checkpoint("eva02", str(src), str(tmp_path / "out"))
    state = torch.load(src / "LLM2CLIP-EVA02-L-14-336.pt", weights_only=True)
    model = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    torch.manual_seed(2)
    pixels, emb = torch.randn(3, 3, 32, 32), torch.randn(4, LLM) * 7.0
    with torch.no_grad():
        out = model(pixels, emb)
        img, txt = ref_eva_image_features(state, pixels), ref_text_features(state, emb, "text.text_adaptor")
        diffs = parity(out, img, txt, state["logit_scale"])
    print(f"eva02 parity (max abs diff): {diffs}")
    assert max(v for k, v in diffs.items() if k != "logits") < 1e-5 and diffs["logits/scale"] < 1e-6, diffs
    assert (img @ txt.T).abs().max() > 0.1
    assert result.filled == {} and len(result.dropped) == 2 * (EVA["layers"] + 1)  # the rotary tables
    assert all("rotary" in why for why in result.dropped.values())
    config = json.loads((tmp_path / "out" / "llm2clip_config.json").read_text())
    assert config["tower"]["spec"]["kind"] == "eva02" and config["tower"]["spec"]["config"]["heads"] == 4
    record = read_manifest("train_vision", tmp_path / "out")["imported_from"]
    assert record["files"] == {"LLM2CLIP-EVA02-L-14-336.pt": sha256_file(src / "LLM2CLIP-EVA02-L-14-336.pt")}


def test_eva02_reads_the_eva_clip_pt_beside_other_files_and_checks_a_reference_config(tmp_path):
    src = write_eva_release(tmp_path / "src")
    save_file({"vision_model.embeddings.x": torch.zeros(2)}, str(src / "model.safetensors"))  # the HF-format file
    reference_config = {"embed_dim": EMBED, "vision_cfg": {
        "image_size": 32, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.6667, "patch_size": 8,
        "eva_model_name": "eva-clip-l-14-336", "xattn": True, "fusedLN": True, "rope": True, "pt_hw_seq_len": 16,
        "intp_freq": True, "naiveswiglu": True, "subln": True}}
    (src / "config.json").write_text(json.dumps(reference_config))
    result = import_checkpoint("eva02", str(src), str(tmp_path / "out"))
    assert "model.safetensors" in result.dropped and "agrees" in " ".join(result.notes)
    reference_config["vision_cfg"]["width"] = 64
    (src / "config.json").write_text(json.dumps(reference_config))
    with pytest.raises(StageError, match=r"vision_cfg does not match the weights: width=64 \(weights: 32\)"):
        import_checkpoint("eva02", str(src), str(tmp_path / "out2"))


@pytest.mark.parametrize("change, expected", [
    ("missing", "visual.*: eva02 checkpoint does not match the tower: missing ['blocks.1.mlp.w3.bias']"),
    ("extra", "source keys no rule takes [text.token_embedding.weight]"),
    ("no_eva", "holds no eva_clip EVA02 checkpoint"),
])
def test_eva02_wrong_layout_is_one_clear_error(tmp_path, change, expected):
    state = eva_release_state()
    if change == "missing":
        del state["visual.blocks.1.mlp.w3.bias"]
    elif change == "extra":
        state["text.token_embedding.weight"] = torch.zeros(4, 8)
    else:
        state = {k.replace("visual.", "vision."): v for k, v in state.items()}
    src = write_eva_release(tmp_path / "src", state)
    with pytest.raises(StageError) as err:
        import_checkpoint("eva02", str(src), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()  # a refused source writes nothing


# ------------------------------------------------------------------------------------------ CLI


def test_cli_kinds_are_the_importer_table():
    assert IMPORT_KINDS == tuple(KINDS)


def test_cli_imports_and_user_errors_are_one_line(released, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "vision"
    assert main(["import", "openai-vit", str(released["openai_src"]), str(out)]) == 0
    assert LLM2CLIPModel.from_pretrained(out).embed_dim == EMBED
    assert "import done" in caplog.text
    for argv, expected in (
        (["import", "openai-vit", str(tmp_path / "nowhere"), str(tmp_path / "x")], "is not a directory"),
        (["import", "siglip", str(released["openai_src"]), str(tmp_path / "y")], "unknown import kind 'siglip'"),
        (["import", "openai-vit", str(released["openai_src"]), str(tmp_path / "z"), "--link", "copy"],
         "options ['link'] do not apply"),
        (["import", "caption-encoder", str(released["openai_src"]), str(tmp_path / "w")], "lacks"),
    ):
        caplog.clear()
        assert main(argv) == 2, argv
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0].getMessage(), caplog.text
        assert errors[0].getMessage().startswith("import failed:") and expected in errors[0].getMessage()


# ------------------------------------------------------------------- evaluate and fine-tuning


@pytest.fixture(scope="module")
def chain(released):
    """Prepared data and its embeddings made by the *imported* caption encoder."""
    from llm2clip.config import CommonConfig, EmbedCaptionsConfig, PrepareDataConfig, SyntheticSource, ValidationConfig
    from llm2clip.stages import embed_captions, prepare_data

    off = CommonConfig(tracking=False)
    data, emb = released["root"] / "data", released["root"] / "embeddings"
    prepare_data.run(PrepareDataConfig(
        sources=(SyntheticSource(name="scenes", count=24, image_size=48),), val_fraction=0.3, shard_size=12,
        image_max_side=48, validation=ValidationConfig(min_valid_fraction=0.5)), off, data=str(data))
    embed_captions.run(EmbedCaptionsConfig(device="cpu", threads=1, num_workers=1, zeroshot_templates=("a {}",)),
                       off, data=str(data), caption_encoder=str(released["encoder"]), embeddings=str(emb))
    return {"data": str(data), "embeddings": str(emb), "off": off}


def test_imported_model_scores_with_evaluate(released, chain, tmp_path):
    from llm2clip.config import EvalSet, EvaluateConfig
    from llm2clip.eval.harness import embed_set
    from llm2clip.stages import evaluate

    model = LLM2CLIPModel.from_pretrained(released["vision"])
    embedded = embed_set(model, chain["data"], chain["embeddings"], "val")
    assert embedded.image_emb.shape[1] == EMBED
    result = evaluate.run(EvaluateConfig(compare_champion=False, recall_max_k=5, eval_sets=(EvalSet(),)),
                          chain["off"], data=chain["data"], embeddings=chain["embeddings"],
                          vision_model=str(released["vision"]), report=str(tmp_path / "report"))
    assert 0.0 <= result.primary <= 1.0
    assert any(k.endswith("image_to_text_R_at_1") for k in result.metrics)
    report = read_manifest("evaluate", tmp_path / "report")
    assert report["caption_encoder"]["fingerprint"] == LLM2CLIPModel.from_pretrained(
        released["vision"]).caption_encoder_fingerprint  # the lineage check matched the import's record

    # ... and register takes it (the lineage of model, encoder and report all check out)
    from llm2clip.config import CommonConfig, RegisterConfig
    from llm2clip.stages import register

    tracked = CommonConfig(tracking=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                           registered_model="imported-openai-vit")
    registered = register.run(RegisterConfig(), tracked, vision_model=str(released["vision"]),
                              caption_encoder=str(released["encoder"]), report=str(tmp_path / "report"),
                              registration=str(tmp_path / "registration"))
    assert "champion" in json.loads((tmp_path / "registration" / "registration.json").read_text())["aliases"]
    assert registered.summary()


def test_train_vision_runs_from_an_imported_model(released, chain, tmp_path):
    """``train_vision.init_model``: the stage fine-tunes the imported model."""
    from llm2clip.config import TrainVisionConfig
    from llm2clip.io import StageError
    from llm2clip.stages import train_vision

    start = LLM2CLIPModel.from_pretrained(released["vision"]).state_dict()
    cfg = TrainVisionConfig(init_model=str(released["vision"]), embed_dim=EMBED, batch_size=4, max_steps=2,
                            lr=1e-4, warmup_steps=0, workers=0, val_batch_size=8)
    with pytest.raises(StageError, match="was trained with 'clip'; use auto or 'clip', got 'siglip'"):
        train_vision.run(dataclasses.replace(cfg, loss="siglip"), chain["off"], data=chain["data"],
                         embeddings=chain["embeddings"], vision_model=str(tmp_path / "refused"))
    out = tmp_path / "finetuned"
    train_vision.run(cfg, chain["off"], data=chain["data"], embeddings=chain["embeddings"], vision_model=str(out))
    tuned = LLM2CLIPModel.from_pretrained(out)
    moved = {k: max_diff(v, start[k]) for k, v in tuned.state_dict().items()}
    assert 0 < max(moved.values()) < 0.05  # trained from the imported weights, not from scratch
    imported = LLM2CLIPModel.from_pretrained(released["vision"])
    assert tuned.caption_encoder_fingerprint == imported.caption_encoder_fingerprint
    assert json.loads((out / "llm2clip_config.json").read_text())["tower"]["spec"]["kind"] == "clip"
