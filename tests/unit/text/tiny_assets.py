"""Tiny offline assets for the text tests: a random Llama, a word-level tokenizer, shards.

Imported by tests/unit/text/* and tests/stages/test_caption_contrastive.py (by path).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

WORDS = (
    "a an the red green blue yellow black white small big tiny large circle square triangle star "
    "cat dog car tree house boat left right above below next to of on in with and two three one "
    "picture photo image showing shows scene there is are background center corner"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", ":", ",", "."]

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cat", "dog", "car", "tree", "house", "boat"]
PLACES = ["left", "right", "center", "corner"]


def make_tokenizer(directory: Path, bos: bool = True):
    """A word-level fast tokenizer saved to ``directory`` (adds ``<s>`` in front if ``bos``)."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    return fast


def make_llama(directory: Path, seed: int = 0, hidden: int = 32, causal_lm: bool = True):
    """A 2-layer random Llama (4 heads, 2 kv heads) saved with its tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
    )
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def make_decoder(family: str, vocab: int, **overrides):
    """A random 2-layer decoder backbone of ``family`` (hidden 32, 4 heads, 2 kv heads), in memory.

    Families: llama, qwen2 (q/k/v biases), mistral, gemma, gemma2 (sliding window 4).
    """
    import torch
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaModel, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2Model, {}),
        "mistral": (tf.MistralConfig, tf.MistralModel, {"sliding_window": None}),
        "gemma": (tf.GemmaConfig, tf.GemmaModel, {"head_dim": 8}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2Model, {"head_dim": 8, "sliding_window": 4}),
    }
    config_cls, model_cls, extra = configs[family]
    config = config_cls(**common, **{**extra, **overrides})
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # gemma2 has no sdpa
    torch.manual_seed(0)
    return model_cls(config).eval()


def scene(i: int) -> tuple[str, str]:
    """Short and dense caption of synthetic scene ``i`` (deterministic)."""
    c1, s1 = COLOURS[i % 6], SHAPES[(i // 6) % 10]
    c2, s2 = COLOURS[(i // 60 + 3) % 6], SHAPES[(i * 7 + 1) % 10]
    place = PLACES[(i // 3) % 4]
    short = f"a {c1} {s1} and a {c2} {s2}"
    dense = f"a picture showing a {c1} {s1} in the {place} , next to a {c2} {s2}"
    return short, dense


def write_shards(root: Path, n_train: int = 48, n_val: int = 16, per_shard: int = 20) -> Path:
    """prepare_data-style shards: ``{split}-NNNNNN.tar`` with ``jpg`` + ``json`` and a manifest."""
    import hashlib

    root.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[dict]] = {}
    index = 0
    for split, count in (("train", n_train), ("val", n_val)):
        shards[split] = []
        for shard_no, start in enumerate(range(0, count, per_shard)):
            name = f"{split}-{shard_no:06d}.tar"
            n = min(per_shard, count - start)
            with tarfile.open(root / name, "w") as tar:
                for _ in range(n):
                    key = f"{index:08d}"
                    short, dense = scene(index)
                    meta = {"key": key, "captions": {"short": [short], "dense": [dense]},
                            "source": "tiny"}
                    for ext, data in (("jpg", b"\xff\xd8\xff\xd9"), ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    index += 1
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            shards[split].append({"name": name, "count": n, "sha256": digest})
    manifest = {"stage": "prepare_data", "format_version": 1, "caption_fields": ["short", "dense"],
                "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
