"""``llm2clip import openai-vit``: ``microsoft/LLM2CLIP-Openai-*`` -> an :class:`LLM2CLIPModel` dir.

The released repos hold a Hugging Face model with custom code (``trust_remote_code``; never run
here): a CLIP vision transformer, a projection, the LLM2CLIP text adapter and ``logit_scale``. The
layout (``docs/released-checkpoints.md`` says where each part was read and what is assumed):

``config.json``
    a ``CLIPConfig``: ``vision_config`` (the ``CLIPVisionConfig`` of the tower; a key left out
    means the ``CLIPVisionConfig`` default, as transformers reads it), ``projection_dim`` (1280),
    ``text_config`` and ``logit_scale_init_value`` (unused: no CLIP text tower is released and the
    trained ``logit_scale`` is a tensor).
weights (``model.safetensors`` or shards; a pickle-free ``pytorch_model.bin``)
    ============================================  ==========================================
    released key                                  ours
    ============================================  ==========================================
    ``vision_model.<name>``                       ``tower.model.<name>`` (HF ``CLIPVisionModel``)
    ``vision_model.embeddings.position_ids``      dropped: a buffer transformers rebuilds
    ``visual_projection.weight``                  ``head.weight`` (``get_image_features``)
    ``visual_projection.bias``                    ``head.bias``; absent (HF CLIP's projection has
                                                  none): filled with zeros
    ``text_adapter.adaptor.<i>.<rest>``           ``adapter.text_adaptor.<i>.<rest>``
    ``logit_scale`` (0-d)                         ``logit_scale`` (shape ``[1]``)
    ============================================  ==========================================
``preprocessor_config.json`` (optional; the release ships none)
    ``image_mean``/``image_std`` when present, else OpenAI CLIP's, as the HF card's processor
    (``openai/clip-vit-large-patch14-336``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llm2clip.importers import ImportResult
from llm2clip.importers.common import (
    KeyMap,
    dtypes_of,
    hash_files,
    load_tensors,
    output_dir,
    read_json,
    safetensors_files,
    source_dir,
)
from llm2clip.importers.vision_output import adapter_dims, caption_encoder_record, write_vision_import
from llm2clip.io import StageError
from llm2clip.vision.model import LLM2CLIPModel
from llm2clip.vision.towers import TowerSpec, build_tower
from llm2clip.vision.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess

log = logging.getLogger(__name__)

KIND = "openai-vit"
# CLIPVisionConfig's defaults (transformers 4.46, the release's; the same in 5.x): what a key that
# save_pretrained left out of vision_config (it writes only non-default values) stands for.
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
}
WEIGHT_PICKLES = ("pytorch_model.bin",)


def read_weights(src: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The release's tensors: safetensors (one file or the index's shards), else ``pytorch_model.bin``.

    Raises:
        StageError: no weights file.
    """
    files = safetensors_files(src)
    if not files:
        files = [src / name for name in WEIGHT_PICKLES if (src / name).is_file()]
    if not files:
        raise StageError(f"import {KIND}: {src} holds no model.safetensors (or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_tensors(file))
    return state, files


def vision_config(config: dict[str, Any], state: dict[str, torch.Tensor], what: str
                  ) -> tuple[dict[str, Any], list[str]]:
    """The tower's ``CLIPVisionConfig`` keys from ``config.json``, checked against the weights.

    Returns:
        ``(config, keys that took the CLIPVisionConfig default)``.

    Raises:
        StageError: no ``vision_config``, or sizes that the weights contradict (listed).
    """
    given = config.get("vision_config")
    if not isinstance(given, dict):
        raise StageError(f"{what}: config.json has no vision_config object (not a released LLM2CLIP-Openai config)")
    arch = {k: given.get(k, default) for k, default in VISION_DEFAULTS.items()}
    defaulted = sorted(k for k in VISION_DEFAULTS if k not in given)
    prefix = "vision_model."
    needed = [f"{prefix}{k}" for k in ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                                        "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight")]
    absent = [k for k in needed if k not in state]
    if absent:
        raise StageError(f"{what} is not in the released layout: no {absent}")
    patch = state[f"{prefix}embeddings.patch_embedding.weight"]
    positions = int(state[f"{prefix}embeddings.position_embedding.weight"].shape[0])
    layers = len({k.split(".")[3] for k in state if k.startswith(f"{prefix}encoder.layers.")})
    seen = {"hidden_size": int(state[f"{prefix}embeddings.class_embedding"].shape[0]),
            "patch_size": int(patch.shape[-1]), "num_channels": int(patch.shape[1]),
            "image_size": int(round((positions - 1) ** 0.5)) * int(patch.shape[-1]),
            "num_hidden_layers": layers,
            "intermediate_size": int(state[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0])}
    wrong = [f"{k}={arch[k]} (weights: {v})" for k, v in seen.items() if arch[k] != v]
    if wrong:
        raise StageError(f"{what}: config.json vision_config does not match the weights: {', '.join(wrong)}")
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise StageError(f"{what}: vision_config hidden_size {arch['hidden_size']} is not a multiple of "
                         f"num_attention_heads {arch['num_attention_heads']}")
    return arch, defaulted


def preprocess(src: Path, image_size: int) -> tuple[Preprocess, str]:
    """The eval preprocessing: ``preprocessor_config.json``'s mean/std if shipped, else OpenAI CLIP's."""
    processor = read_json(src / "preprocessor_config.json", KIND, required=False)
    if not processor:
        return (Preprocess(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                "no preprocessor_config.json: OpenAI CLIP mean/std (the HF card's CLIPImageProcessor)")
    return (Preprocess(image_size, tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)),
                       tuple(processor.get("image_std", OPENAI_CLIP_STD))), "preprocessor_config.json")


def key_map(target: dict[str, torch.Tensor]) -> KeyMap:
    """The released -> ours key rules (module docstring), for our tower's key prefix."""
    anchor = next(k for k in target if k.endswith("embeddings.class_embedding"))
    tower = anchor[: -len("embeddings.class_embedding")]  # "tower.model." (transformers 5) or "...vision_model."
    return KeyMap(
        rules=[(r"vision_model\.(.+)", tower + r"\1"), (r"visual_projection\.(weight|bias)", r"head.\1"),
               (r"text_adapter\.adaptor\.(.+)", r"adapter.text_adaptor.\1"), (r"logit_scale", "logit_scale")],
        drops=[(r"vision_model\.embeddings\.position_ids", "a buffer (patch positions 0..N) transformers rebuilds")],
        fills={"head.bias": (torch.zeros_like, "zeros: visual_projection has no bias (HF CLIP's projection, "
                                              "and the reference VisionTransformer's proj, are bias-free)")},
    )


def import_openai_vit(src: str, dst: str, *, caption_encoder: str | None = None,
                      overwrite: bool = False) -> ImportResult:
    """Import a ``microsoft/LLM2CLIP-Openai-*`` snapshot into an ``LLM2CLIPModel`` dir.

    Args:
        src: Local snapshot of the released repo (``config.json`` + weights).
        dst: Output directory (new or empty; a previous import with ``overwrite``).
        caption_encoder: The imported caption-encoder dir the model pairs with (recorded with its
            fingerprint, so evaluate checks the embeddings were made with it).
        overwrite: Replace a previous import in ``dst``.

    Raises:
        StageError: the source is not in the released layout (the message lists the keys).
    """
    root = source_dir(src, KIND)
    what = f"import {KIND}: {root}"
    config = read_json(root / "config.json", KIND)
    state, files = read_weights(root)
    arch, defaulted = vision_config(config, state, what)
    dims = adapter_dims(state, "text_adapter.adaptor", what)
    if "visual_projection.weight" not in state or "logit_scale" not in state:
        missing = [k for k in ("visual_projection.weight", "logit_scale") if k not in state]
        raise StageError(f"{what} is not in the released layout: no {missing}")
    embed_dim = int(state["visual_projection.weight"].shape[0])
    declared = config.get("projection_dim", embed_dim)
    if not embed_dim == dims["embed_dim"] == declared:
        raise StageError(f"{what}: projection widths disagree: visual_projection {embed_dim}, adapter "
                         f"{dims['embed_dim']}, config.json projection_dim {declared}")
    encoder_path, fingerprint = caption_encoder_record(caption_encoder)
    tower = build_tower(TowerSpec(kind="clip", config=arch, image_size=arch["image_size"], pretrained=False))
    tower.preprocess, pre_source = preprocess(root, arch["image_size"])
    model = LLM2CLIPModel(tower, llm_dim=dims["llm_dim"], embed_dim=embed_dim, adapter_blocks=dims["num_blocks"],
                          adapter_expansion=dims["expansion"],
                          logit_scale_init=float(state["logit_scale"].float().reshape(-1)[0]), loss="clip",
                          caption_encoder=encoder_path, caption_encoder_fingerprint=fingerprint)
    mapped, dropped, filled = key_map(model.state_dict()).apply(state, model.state_dict(), what)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    notes = [f"preprocess: {pre_source}"]
    if defaulted:
        notes.append(f"vision_config keys absent from config.json, read as CLIPVisionConfig defaults: "
                     f"{', '.join(f'{k}={VISION_DEFAULTS[k]!r}' for k in defaulted)}")
    notes.append("text adapter: our TextAdapter L2-normalises its input (reference TextProj, l2_norm=True "
                 "since 2024-11-22); docs/released-checkpoints.md: whether the release's adapter does")
    ignored = sorted(k for k in config.get("vision_config", {}) if k not in VISION_DEFAULTS)
    source_files = hash_files(root, [p.name for p in files] + [n for n in ("config.json", "preprocessor_config.json",
                                                                          "model.safetensors.index.json")
                                                              if (root / n).is_file()])
    out = output_dir(dst, root, KIND, overwrite)  # after every check: a refused source writes nothing
    return write_vision_import(
        model, out, KIND, root, source_files, release=config.get("_name_or_path") or None, dropped=dropped,
        filled=filled, notes=notes, source_dtypes=dtypes_of(state.values()),
        config_used={"vision_config": sorted(k for k in arch if k not in defaulted), "projection_dim": declared},
        config_ignored={"vision_config": ignored, "top_level": sorted(
            k for k in config if k not in ("vision_config", "projection_dim"))},
        adapter=dims, logit_scale=float(state["logit_scale"].float().reshape(-1)[0]))
