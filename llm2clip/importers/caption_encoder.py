"""``llm2clip import caption-encoder``: the released CC-finetuned Llama -> a caption-encoder dir.

``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`` (and the 3.2-1B one) is a merged Llama
(``config.json`` with ``model_type: llama``; its ``auto_map`` names McGill's
``modeling_llama_encoder.LlamaEncoderModel``, a ``LlamaModel`` with bidirectional attention,
which is never run here), safetensors weights and the Llama-3 tokenizer. The import:

- checks every weight name and shape against ``LlamaModel(config)`` (built on the meta device:
  nothing is loaded), a ``model.`` prefix and an ``lm_head`` allowed;
- checks that the tokenizer has the Llama-3 chat tokens the prompt template needs;
- copies (or hard-/sym-links) the model and tokenizer files, byte for byte;
- writes the settings the released vision models were trained with
  (:data:`SETTINGS`; where each comes from: :data:`SETTINGS_SOURCES`) to
  ``llm2clip_text_encoder.json``;
- writes, last, a ``caption_contrastive`` manifest (so embed_captions' lineage check accepts the
  dir) with ``imported_from``: the source dir, the sha256 of every file read, what was left out.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from llm2clip.contracts import write_manifest
from llm2clip.importers import ImportResult
from llm2clip.importers.common import (
    SAFETENSORS_INDEX,
    KeyMap,
    hash_files,
    output_dir,
    provenance,
    read_json,
    safetensors_files,
    source_dir,
    written_or_emptied,
)
from llm2clip.io import StageError, atomic_write_json, sha256_file
from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

log = logging.getLogger(__name__)

KIND = "caption-encoder"
LinkMode = Literal["hardlink", "copy", "symlink"]

# The Llama-3-Instruct user turn llm2vec wraps every text in (the BOS comes from the tokenizer).
LLAMA3_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{instruction}{text}<|eot_id|>"
TEMPLATE_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# The CC fine-tune's query instruction for a short caption retrieving its long one, with the "; "
# the dataset puts before the separator; the long->short direction used
# "Given a detailed sentence, retrieve a short relevant sentence; ".
QUERY_INSTRUCTION = "Given a sentence, retrieve a detailed relevant sentence; "

RELEASES = {  # (hidden_size, num_hidden_layers) -> the release with that architecture
    (4096, 32): "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
    (2048, 16): "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned",
}

SETTINGS = EncoderSettings(
    pooling="mean", bidirectional=True, prompt_template=LLAMA3_TEMPLATE, instruction="",
    query_instruction=QUERY_INSTRUCTION, max_length=512, padding_side="left", attn_implementation="sdpa",
)
# Where each setting comes from in the reference (microsoft/LLM2CLIP; paths inside that repo).
SETTINGS_SOURCES = {
    "pooling": "llm2clip/data/extract_embedding.py: LLM2Vec(..., pooling_mode='mean'); training config "
               "llm_caption_contrastive/train_configs/supervised/MetaLlama3_cc3m.json pooling_mode 'mean'",
    "bidirectional": "config.json auto_map -> McGill modeling_llama_encoder.LlamaEncoderModel (attention "
                     "is_causal=False); MetaLlama3_cc3m.json 'bidirectional': true",
    "prompt_template": "llm2clip/llm2vec/llm2vec.py prepare_for_tokenization, Llama-3-Instruct branch "
                       "(extract_embedding.py sets config._name_or_path='meta-llama/Meta-Llama-3-8B-Instruct' "
                       "to select it); the tokenizer adds BOS",
    "instruction": "extract_embedding.py: model.encode(texts) with plain strings -> llm2vec.encode pairs each "
                   "with instruction '' (captions were embedded without one)",
    "query_instruction": "llm_caption_contrastive/dataset/E5_cc3m.py: E5_EMBEDDING_PROMPTS['cc3m'][0] + '; ' "
                         "(query = f'{instruction}; ' + separator + caption); pooled over the caption only "
                         "(llm2vec.py tokenize/_skip_instruction)",
    "max_length": "extract_embedding.py: LLM2Vec(..., max_length=512, doc_max_length=512); MetaLlama3_cc3m.json "
                  "max_seq_length 512",
    "padding_side": "llm2vec.py: from_pretrained sets padding_side='left'; get_pooling asserts left padding",
    "attn_implementation": "ours: sdpa (the reference trained with flash_attention_2, MetaLlama3_cc3m.json; "
                           "the same attention, another kernel)",
    "base_model": "the release with this config's architecture (provenance only)",
}

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "special_tokens_map.json", "llm2vec_config.json")
_DOC_FILES = ("README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md", ".gitattributes")


def _file_plan(root: Path) -> tuple[list[str], dict[str, str]]:
    """``(files to take, file -> why it is left out)`` for the top level of ``root``."""
    weights = [p.name for p in safetensors_files(root)]
    if not weights:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise StageError(f"import {KIND}: {root} holds no safetensors weights"
                         f"{f' (only {pickles}: pickles are not imported)' if pickles else ''}")
    missing = [n for n in REQUIRED_FILES if not (root / n).is_file()]
    if missing:
        raise StageError(f"import {KIND}: {root} lacks {missing} (not a snapshot of the released repo)")
    taken = [*REQUIRED_FILES, *(n for n in OPTIONAL_FILES if (root / n).is_file()), *weights]
    if (root / SAFETENSORS_INDEX).is_file():
        taken.append(SAFETENSORS_INDEX)
    left: dict[str, str] = {}
    for path in sorted(root.iterdir()):
        if path.name in taken or path.is_dir():
            continue
        if path.suffix == ".py":
            left[path.name] = "remote code: never run (the encoder is a plain LlamaModel here)"
        elif path.suffix in (".bin", ".pt", ".pth"):
            left[path.name] = "pickle: the safetensors weights are used"
        elif path.name in _DOC_FILES:
            left[path.name] = "documentation"
        else:
            left[path.name] = "not part of the model or tokenizer"
    return taken, left


def check_weights(root: Path, weights: list[str]) -> tuple[Any, dict[str, str]]:
    """Every tensor name and shape of the weight files against ``LlamaModel(config)``.

    Returns:
        ``(config, dropped source key -> why)``.

    Raises:
        StageError: not a Llama config, or names/shapes that do not fit (listed).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel, LlamaConfig

    # a local snapshot: local_files_only, nothing to pin
    config = AutoConfig.from_pretrained(root, trust_remote_code=False, local_files_only=True)  # nosec B615
    if not isinstance(config, LlamaConfig):
        raise StageError(f"import {KIND}: {root}/config.json is a {config.model_type!r} config; the released "
                         "caption encoders are Llama models")
    with torch.device("meta"):
        target = AutoModel.from_config(config).state_dict()
    source: dict[str, torch.Tensor] = {}
    for name in weights:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():
                source[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
    rules = KeyMap(rules=[(r"(?:model\.)?(.+)", r"\1")],
                   drops=[(r"lm_head\.weight", "the LM head: the encoder is the bare LlamaModel (llm2vec's AutoModel)"),
                          (r"(?:model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                           "a rotary buffer transformers rebuilds")])
    _, dropped, _ = rules.apply(source, target, f"import {KIND}: {root} weights")
    return config, dropped


def check_tokenizer(root: Path) -> None:
    """The tokenizer loads (fast, no remote code) and knows the template's special tokens.

    Raises:
        StageError: naming the tokens it lacks.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False,  # nosec B615  # a local snapshot
                                              local_files_only=True)
    if not tokenizer.is_fast:
        raise StageError(f"import {KIND}: {root} has no fast tokenizer (tokenizer.json)")
    vocab = tokenizer.get_vocab()
    lacking = [t for t in TEMPLATE_TOKENS if t not in vocab]
    if lacking:
        raise StageError(f"import {KIND}: the tokenizer in {root} lacks the Llama-3 chat tokens {lacking} the "
                         "prompt template needs (not a Llama-3-Instruct tokenizer)")


def _place(source: Path, target: Path, link: LinkMode) -> str:
    """Put ``source`` at ``target``; returns how (a hard link falls back to a copy across filesystems)."""
    source = source.resolve()  # HF cache snapshots are symlinks into blobs/
    if link == "symlink":
        target.symlink_to(source)
        return "symlink"
    if link == "hardlink":
        try:
            os.link(source, target)
            return "hardlink"
        except OSError as err:
            log.info("cannot hard-link %s (%s); copying", source.name, err.strerror)
    shutil.copyfile(source, target)
    return "copy"


def import_caption_encoder(src: str, dst: str, *, link: LinkMode = "hardlink",
                           overwrite: bool = False) -> ImportResult:
    """Import a released CC-finetuned Llama snapshot into a caption-encoder dir.

    Args:
        src: Local snapshot of the released repo.
        dst: Output directory (new or empty; a previous import with ``overwrite``).
        link: ``hardlink`` (default; a copy where that is impossible), ``copy`` or ``symlink``
            (then ``dst`` needs ``src`` to stay where it is).
        overwrite: Replace a previous import in ``dst``.

    Raises:
        StageError: the source is not in the released layout (the message lists the keys/files).
    """
    if link not in ("hardlink", "copy", "symlink"):
        raise StageError(f"import {KIND}: --link must be hardlink, copy or symlink, got {link!r}")
    root = source_dir(src, KIND)
    read_json(root / "config.json", KIND)
    taken, left_out = _file_plan(root)
    weights = [n for n in taken if n.endswith(".safetensors")]
    config, dropped_keys = check_weights(root, weights)
    check_tokenizer(root)
    log.info("hashing %d source files (%.1f GB)", len(taken), sum((root / n).stat().st_size for n in taken) / 1e9)
    source_files = hash_files(root, taken)
    release = RELEASES.get((config.hidden_size, config.num_hidden_layers), f"unknown release ({root.name})")
    settings = EncoderSettings(**{**SETTINGS.to_dict(), "base_model": release})
    notes = ["the reference strips each caption (text.strip()) and word-truncates captions over 512 tokens "
             "(llm2vec _convert_to_str); the encoder here embeds the caption as given and truncates by tokens"]
    out = output_dir(dst, root, KIND, overwrite)  # after every check: a refused source writes nothing
    with written_or_emptied(out):
        how = {name: _place(root / name, out / name, link) for name in taken}
        atomic_write_json(out / SETTINGS_FILE, settings.to_dict())
        files = {**source_files, SETTINGS_FILE: sha256_file(out / SETTINGS_FILE)}
        record = provenance(KIND, root, source_files, release=release, dropped={**dropped_keys, **left_out},
                            notes=notes, placed=sorted(set(how.values())), settings_sources=SETTINGS_SOURCES)
        write_manifest("caption_contrastive", out, {
            "config_hash": None, "base_model": release, "resolved_model": str(root), "cra_before": None,
            "cra_after": None, "data": None, "training": None, "wall_time_s": None, "probe": None,
            "settings_file": SETTINGS_FILE, "settings": settings.to_dict(),
            "embedding_dim": int(config.hidden_size), "cra_protocol": None, "files": files,
            "imported_from": record,
        })
    log.info("imported the caption encoder %s from %s into %s (%d files, %s; %d left out)", release, root, out,
             len(taken), "/".join(sorted(set(how.values()))), len(left_out))
    return ImportResult(KIND, str(root), str(out), len(taken), {**dropped_keys, **left_out}, {}, tuple(notes))
