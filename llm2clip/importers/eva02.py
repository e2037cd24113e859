"""``llm2clip import eva02``: ``microsoft/LLM2CLIP-EVA02-*`` -> an :class:`LLM2CLIPModel` dir.

The released EVA02 repos ship the ``eva_clip`` checkpoint (``LLM2CLIP-EVA02-L-14-336.pt``, ...): the
plain state dict of the reference ``CustomCLIP`` built by ``create_model_and_transforms(
'EVA02-CLIP-L-14-336', force_custom_clip=True)`` (issue #34, the Llama3.2-1B-EVA02 card). That is
the layout read here (the repos' Hugging Face-format files are not: their layout is not visible
offline, docs/released-checkpoints.md):

============================================  ================================================
released key                                  ours
============================================  ================================================
``visual.<tower key>``                        ``tower.<key>`` through
                                              :meth:`~llm2clip.vision.eva02.EVA02Tower.load_reference_state_dict`
                                              (``attn.q_proj.bias``/``v_proj.bias`` -> ``q_bias``/``v_bias``)
``visual.rope.freqs_*``,                      dropped: rotary tables, buffers the tower computes
``visual.blocks.<i>.attn.rope.freqs_*``       from its config (the test checks they agree)
``visual.head.{weight,bias}``                 ``head.{weight,bias}`` (EVA ``head``, ``Linear(width, 1280)``)
``text.text_adaptor.<i>.<rest>``              ``adapter.text_adaptor.<i>.<rest>`` (``TextProj``)
``logit_scale`` (0-d)                         ``logit_scale`` (``[1]``)
============================================  ================================================

The tower's sizes are read from the weights (width, depth, patch, image size, SwiGLU width; the
head width from a rotary table when the checkpoint has one, else EVA02's ``head_width`` 64);
``rope_grid`` is EVA02's ``pt_hw_seq_len`` 16. A reference model config next to the weights
(``config.json`` with ``vision_cfg``, as ``model_configs/EVA02-CLIP-*.json``) is checked against them.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from llm2clip.importers import ImportResult
from llm2clip.importers.common import (
    PICKLE_SUFFIXES,
    KeyMap,
    dtypes_of,
    hash_files,
    load_tensors,
    output_dir,
    read_json,
    source_dir,
)
from llm2clip.importers.vision_output import adapter_dims, caption_encoder_record, write_vision_import
from llm2clip.io import StageError
from llm2clip.vision.model import LLM2CLIPModel
from llm2clip.vision.towers import TowerSpec, build_tower

log = logging.getLogger(__name__)

KIND = "eva02"
HEAD_WIDTH = 64  # every EVA02-CLIP model config's vision_cfg.head_width
ROPE_GRID = 16  # every EVA02-CLIP model config's vision_cfg.pt_hw_seq_len
ANCHOR = "visual.cls_token"  # a key only an eva_clip EVA checkpoint has
ROPE_TABLE = re.compile(r"(?:blocks\.\d+\.attn\.)?rope\.freqs_(?:cos|sin)")


def find_checkpoint(src: Path) -> tuple[dict[str, torch.Tensor], Path, dict[str, str]]:
    """The eva_clip checkpoint of the snapshot: the weights file whose keys are ``visual.*``.

    Pickles (the release's ``.pt``) are tried first, then safetensors.

    Returns:
        ``(state dict, its file, other weight files -> why they were not used)``.

    Raises:
        StageError: no file in the eva_clip layout (the files and their first keys are listed).
    """
    files = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES) + sorted(src.glob("*.safetensors"))
    seen, others = [], {}
    for file in files:
        state = load_tensors(file)
        if ANCHOR in state:
            others |= {p.name: "another weights file (not read: the eva_clip checkpoint is "
                               f"{file.name})" for p in files if p != file and p.name not in others}
            return state, file, others
        others[file.name] = "not the eva_clip layout (no visual.cls_token)"
        seen.append(f"{file.name} ({', '.join(sorted(state)[:2])}, ...)")
    raise StageError(f"import {KIND}: {src} holds no eva_clip EVA02 checkpoint (keys visual.*, text.text_adaptor.*, "
                     f"logit_scale: the release's LLM2CLIP-EVA02-*.pt); weight files: {seen or 'none'}")


def tower_config(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, Any], list[str]]:
    """The eva02 tower sizes from the weights.

    Returns:
        ``(config, notes on what could not be read from the weights)``.
    """
    needed = [f"visual.{k}" for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.w1.weight")]
    absent = [k for k in needed if k not in state]
    if absent:
        raise StageError(f"{what} is not in the released layout: no {absent}")
    width = int(state["visual.cls_token"].shape[-1])
    patch = int(state["visual.patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["visual.pos_embed"].shape[1]) - 1)
    hidden = int(state["visual.blocks.0.mlp.w1.weight"].shape[0])
    layers = len({k.split(".")[2] for k in state if k.startswith("visual.blocks.")})
    notes = [f"rope_grid {ROPE_GRID}: EVA02's pt_hw_seq_len (not in the weights)"]
    if "visual.rope.freqs_cos" in state:
        heads = width // int(state["visual.rope.freqs_cos"].shape[-1])
    else:
        heads = width // HEAD_WIDTH
        notes.append(f"heads {heads}: EVA02's head_width {HEAD_WIDTH} (no rotary table in the checkpoint)")
    ratio = next((r for r in (2.6667, hidden / width) if int(width * r) == hidden), None)
    if ratio is None:
        raise StageError(f"{what}: SwiGLU width {hidden} is no int(width * mlp_ratio) of width {width}")
    config = {"width": width, "layers": layers, "heads": heads, "mlp_ratio": ratio, "patch_size": patch,
              "image_size": grid * patch, "rope_grid": ROPE_GRID}
    return config, notes


def check_reference_config(src: Path, config: dict[str, Any], embed_dim: int, what: str) -> str:
    """A reference model config (``config.json`` with ``vision_cfg``) must agree with the weights.

    Returns:
        What was found (for the notes).
    """
    from llm2clip.vision.eva02 import config_from_json

    data = read_json(src / "config.json", KIND, required=False)
    if "vision_cfg" not in data:
        return ("config.json: not a reference model config (no vision_cfg): not read" if data
                else "no config.json: sizes from the weights")
    try:
        declared = config_from_json(data)
    except ValueError as err:
        raise StageError(f"{what}: config.json: {err}") from None
    wrong = [f"{k}={declared[k]} (weights: {config[k]})" for k in config
             if k in declared and not math.isclose(float(declared[k]), float(config[k]), rel_tol=1e-3)]
    if wrong:
        raise StageError(f"{what}: config.json vision_cfg does not match the weights: {', '.join(wrong)}")
    if "embed_dim" in data and int(data["embed_dim"]) != embed_dim:
        raise StageError(f"{what}: config.json embed_dim {data['embed_dim']} is not the head's {embed_dim}")
    return "config.json vision_cfg agrees with the weights"


def import_eva02(src: str, dst: str, *, caption_encoder: str | None = None, overwrite: bool = False) -> ImportResult:
    """Import a ``microsoft/LLM2CLIP-EVA02-*`` snapshot (its eva_clip ``.pt``) into an ``LLM2CLIPModel`` dir.

    Args:
        src: Local snapshot of the released repo.
        dst: Output directory (new or empty; a previous import with ``overwrite``).
        caption_encoder: The imported caption-encoder dir the model pairs with (recorded with its
            fingerprint).
        overwrite: Replace a previous import in ``dst``.

    Raises:
        StageError: the source is not in the released layout (the message lists the keys).
    """
    root = source_dir(src, KIND)
    state, file, other_files = find_checkpoint(root)
    what = f"import {KIND}: {root / file.name}"
    config, notes = tower_config(state, what)
    dims = adapter_dims(state, "text.text_adaptor", what)
    if "visual.head.weight" not in state or "logit_scale" not in state:
        raise StageError(f"{what} is not in the released layout: no "
                         f"{[k for k in ('visual.head.weight', 'logit_scale') if k not in state]}")
    embed_dim = int(state["visual.head.weight"].shape[0])
    notes.append(check_reference_config(root, config, embed_dim, what))
    if embed_dim != dims["embed_dim"]:
        raise StageError(f"{what}: projection widths disagree: visual.head {embed_dim}, adapter {dims['embed_dim']}")
    encoder_path, fingerprint = caption_encoder_record(caption_encoder)
    tower = build_tower(TowerSpec(kind="eva02", config=config, image_size=config["image_size"], pretrained=False))
    visual = {k.removeprefix("visual."): v for k, v in state.items()
              if k.startswith("visual.") and not k.startswith("visual.head.")}
    try:
        tower.load_reference_state_dict(visual)  # strict: lists missing/unexpected/wrong-shape keys
    except ValueError as err:
        raise StageError(f"{what} is not in the released layout: visual.*: {err}") from None
    dropped = {f"visual.{k}": "rotary table: a buffer the eva02 tower computes from its config"
               for k in visual if ROPE_TABLE.fullmatch(k)}
    model = LLM2CLIPModel(tower, llm_dim=dims["llm_dim"], embed_dim=embed_dim, adapter_blocks=dims["num_blocks"],
                          adapter_expansion=dims["expansion"],
                          logit_scale_init=float(state["logit_scale"].float().reshape(-1)[0]), loss="clip",
                          caption_encoder=encoder_path, caption_encoder_fingerprint=fingerprint)
    rest = {k: v for k, v in state.items() if not k.startswith("visual.") or k.startswith("visual.head.")}
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}
    keys = KeyMap(rules=[(r"visual\.head\.(weight|bias)", r"head.\1"),
                         (r"text\.text_adaptor\.(.+)", r"adapter.text_adaptor.\1"), (r"logit_scale", "logit_scale")])
    mapped, _, filled = keys.apply(rest, target, what)
    model.load_state_dict({**{f"tower.{k}": v for k, v in tower.state_dict().items()}, **mapped}, strict=True)
    model.eval()
    notes.append("text adapter: our TextAdapter L2-normalises its input (reference TextProj, l2_norm=True since "
                 "2024-11-22); docs/released-checkpoints.md")
    source_files = hash_files(root, [file.name] + (["config.json"] if (root / "config.json").is_file() else []))
    out = output_dir(dst, root, KIND, overwrite)  # after every check: a refused source writes nothing
    return write_vision_import(
        model, out, KIND, root, source_files, release=None, dropped={**dropped, **other_files}, filled=filled,
        notes=notes, source_dtypes=dtypes_of(state.values()), checkpoint=file.name, tower_config=config,
        adapter=dims, logit_scale=float(state["logit_scale"].float().reshape(-1)[0]))
