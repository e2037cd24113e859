"""Start from an LLM2Vec checkpoint: merge saved LoRA adapters into the base model, in order.

An LLM2Vec model is published as a base model plus LoRA adapters: the MNTP adapter, then the
supervised (SimCSE) one; LLM2Vec's ``from_pretrained`` and the LLM2CLIP reference
(``llm_caption_contrastive/llm2vec_wrapper.py``) load each with ``PeftModel.from_pretrained``
and merge it before the next. :func:`merge_adapters` does the same, with two checks peft only
warns about: every tensor of the adapter file must land in the model and every LoRA layer the
adapter config creates must get a tensor (otherwise the merge would silently add nothing).

An adapter may have been saved on the backbone (LLM2Vec's ``LlamaBiModel``: keys
``base_model.model.layers...``) or on a causal LM (``base_model.model.model.layers...``); it is
applied to whichever of the model and its backbone its module names fit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from llm2clip.io import StageError, sha256_file

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def check_adapter_dirs(dirs: Sequence[str | os.PathLike], where: str = "caption_contrastive.init_adapters"
                       ) -> list[dict[str, str]]:
    """Fail fast on a missing adapter, before any model is loaded.

    Returns:
        ``[{"path", "sha256"}]`` of each adapter's weights file (provenance for the manifest).

    Raises:
        StageError: a dir that does not exist or lacks ``adapter_config.json`` /
            ``adapter_model.safetensors``.
    """
    out = []
    for i, directory in enumerate(dirs):
        path = Path(directory).expanduser()
        missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).is_file()]
        if missing:
            what = "does not exist" if not path.is_dir() else f"has no {' or '.join(missing)}"
            raise StageError(f"{where}[{i}]: {directory} {what}; expected a peft LoRA adapter dir "
                             f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}, as PeftModel.save_pretrained writes)")
        out.append({"path": str(directory), "sha256": sha256_file(path / ADAPTER_WEIGHTS)})
    return out


def _adapter_modules(directory: Path) -> tuple[list[str], set[str]]:
    """The tensor names of an adapter file and the module paths they belong to (peft prefix off)."""
    from safetensors import safe_open

    with safe_open(str(directory / ADAPTER_WEIGHTS), "pt") as handle:
        keys = list(handle.keys())
    modules = set()
    for key in keys:
        name = key.removeprefix(_PEFT_PREFIX)
        modules.add(name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0])
    return keys, modules


def _layer_list_name(modules: set[str]) -> str | None:
    """``layers`` for ``model.layers.3.self_attn.q_proj``: the name before the first index."""
    for module in sorted(modules):
        parts = module.split(".")
        for before, part in zip(parts, parts[1:], strict=False):
            if part.isdigit():
                return before
    return None


def _fits(root: nn.Module, modules: set[str]) -> bool:
    names = {name for name, _ in root.named_modules()}
    return modules <= names


def _target(model: nn.Module, modules: set[str]) -> tuple[nn.Module, dict[str, str] | None]:
    """Which module the adapter belongs on, and the key mapping peft needs to load it there."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if _fits(model, modules):
        return model, None
    if isinstance(backbone, nn.Module) and _fits(backbone, modules):
        return backbone, None  # a backbone adapter (LLM2Vec) on a causal LM
    inner = {m.removeprefix(f"{prefix}.") for m in modules if m.startswith(f"{prefix}.")} if prefix else set()
    if inner and len(inner) == len(modules) and _fits(model, inner):
        return model, {rf"^{prefix}\.": ""}  # a causal-LM adapter on the backbone
    raise ValueError(f"its module names do not fit {type(model).__name__} (e.g. {sorted(modules)[0]!r})")


def merge_adapters(model: nn.Module, dirs: Sequence[str | os.PathLike],
                   where: str = "caption_contrastive.init_adapters") -> nn.Module:
    """Merge LoRA adapters into ``model`` in order (base + delta_1 + delta_2 + ...).

    Args:
        model: An HF model (backbone or causal LM), in the dtype the merge should happen in.
        dirs: Adapter dirs (``PeftModel.save_pretrained`` output); () returns ``model`` as is.
        where: Config key for error messages.

    Returns:
        ``model`` with the adapters merged into its weights (no peft wrapper left).

    Raises:
        StageError: a missing adapter, or one that does not fit the model.
    """
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    check_adapter_dirs(dirs, where)
    for i, directory in enumerate(dirs):
        path = Path(directory).expanduser()
        keys, modules = _adapter_modules(path)
        try:
            root, mapping = _target(model, modules)
        except ValueError as err:
            raise StageError(f"{where}[{i}]: {directory}: {err}") from err
        config: Any = PeftConfig.from_pretrained(str(path))
        config.task_type = None  # a plain PeftModel: only the merge is wanted, not a task head
        if getattr(config, "layers_to_transform", None) is not None and not getattr(config, "layers_pattern", None):
            # peft finds the layer index after a "." only: name the layer list, so the same
            # layers are found when the adapter moves from a causal LM onto its backbone
            config.layers_pattern = _layer_list_name(modules)
        peft_model = PeftModel.from_pretrained(root, str(path), config=config, key_mapping=mapping)
        loaded = set(get_peft_model_state_dict(peft_model))
        expected = {_mapped(k, mapping) for k in keys}
        if loaded != expected:
            raise StageError(f"{where}[{i}]: {directory} does not fit the model: "
                             f"{len(expected - loaded)} adapter tensors found no place "
                             f"(e.g. {sorted(expected - loaded)[:2]}), {len(loaded - expected)} LoRA tensors "
                             f"got no value (e.g. {sorted(loaded - expected)[:2]})")
        merged = peft_model.merge_and_unload()
        if root is model:
            model = merged
        log.info("merged LoRA adapter %s (%d tensors, r=%s) into %s", directory, len(keys),
                 getattr(config, "r", "?"), type(model).__name__)
    return model


def _mapped(key: str, mapping: dict[str, str] | None) -> str:
    import re

    if not mapping or not key.startswith(_PEFT_PREFIX):
        return key
    rest = key.removeprefix(_PEFT_PREFIX)
    for pattern, replacement in mapping.items():
        rest = re.sub(pattern, replacement, rest)
    return _PEFT_PREFIX + rest
