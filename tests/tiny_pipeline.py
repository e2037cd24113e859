"""A whole-pipeline params profile on tiny random models: every stage for real, in seconds.

Used by the kfp.local, dvc repro and CLI end-to-end tests. The demo profile (params.yaml) with
the real SmolLM2 / demo data runs in tests/e2e/test_demo.py.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_assets", REPO / "tests" / "unit" / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


def tiny_params(workdir: Path, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml (or ``raw``) with tiny data, a tiny random Llama and a tiny ViT everywhere."""
    raw = copy.deepcopy(raw if raw is not None else yaml.safe_load((REPO / "params.yaml").read_text()))
    model = workdir / "tiny_llm"
    if not (model / "config.json").exists():
        tiny_assets.make_llama(model)
    raw["common"]["registered_model"] = "llm2clip-tiny"
    raw["prepare_data"].update(
        sources=[{"kind": "synthetic", "name": "scenes", "count": 48, "image_size": 48}],
        val_fraction=0.25, shard_size=16, image_max_side=48)
    raw["prepare_data"].setdefault("validation", {})["min_valid_fraction"] = 0.5
    raw.setdefault("caption_contrastive", {}).update(
        model=str(model), prompt_template="[INST] {instruction}{text} [/INST]", instruction="",
        batch_size=8, max_steps=4, warmup_steps=1, checkpoint_every=2, log_every=2, mntp_steps=0,
        nproc_per_node=1)
    raw.setdefault("embed_captions", {}).update(device="cpu", zeroshot_templates=["a {}", "the {}"],
                                                num_workers=1)
    raw.setdefault("train_vision", {}).update(
        tower="vit_scratch", tower_config=TINY_TOWER, image_size=32, embed_dim=16, batch_size=8,
        max_steps=4, warmup_steps=1, workers=0, checkpoint_every=2, log_every=2, nproc_per_node=1)
    raw.setdefault("evaluate", {}).update(min_primary=0.0, batch_size=16)
    _tiny_eval_sets(raw, workdir)
    return raw


def _tiny_eval_sets(raw: dict[str, Any], workdir: Path) -> None:
    """The demo's eval sets, tiny: 16 scenes each, a 6 x 2 ImageNet-style folder in ``workdir``."""
    from llm2clip.data.demo_folder import write_imagenet_folder

    for spec in raw.get("eval_data", {}).values():
        spec["image_max_side"] = 48
        for source in spec["sources"]:
            if source["kind"] == "synthetic":
                source.update(count=16, image_size=48)
            elif source["kind"] == "imagenet":
                folder = write_imagenet_folder(workdir / "demo_folder", per_class=2, image_size=48)
                source["path"] = str(folder.path / "val")


def write_tiny_params(workdir: Path, path: Path | None = None) -> Path:
    path = path or workdir / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(workdir), sort_keys=False))
    return path
