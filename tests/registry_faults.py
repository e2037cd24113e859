"""Helpers for the registration fault drills (tests/test_registration_faults.py).

- :class:`CutFrom`: a rule that cuts every matching request once a trigger request was seen
  ("the server stops answering from the first alias write on");
- a tiny exported model plus the evaluate report the ``register`` stage reads, without running
  evaluate;
- :func:`registry_view`: what the registry's readers would pick up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3_faults import Rule

TOWER = {"kind": "vit_scratch", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "patch_size": 8, "image_size": 16}}
PRIMARY = "score"


@dataclass
class CutFrom(Rule):
    """``action`` for every request matching ``method``/``path`` from a request that matches
    ``trigger`` (a path regex, with ``trigger_method``) on, that one included; the first ``after``
    such trigger requests go through."""

    trigger: str = ""
    trigger_method: str = ""
    after: int = 0
    triggers: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.triggers <= self.after and (not self.trigger_method or method == self.trigger_method) \
                and re.search(self.trigger, path):
            self.triggers += 1
        return self.triggers > self.after and super().matches(method, path)


def tiny_model(directory: Path, seed: int) -> Path:
    """An exported LLM2CLIP model (as train_vision writes it, with a manifest)."""
    import torch

    from llm2clip.vision.model import LLM2CLIPModel

    torch.manual_seed(seed)
    model = LLM2CLIPModel.build(TOWER, llm_dim=32, embed_dim=8, adapter_blocks=1)
    model.save_pretrained(directory)
    (directory / "manifest.json").write_text(json.dumps({"stage": "train_vision", "seed": seed}))
    return directory


def tiny_encoder(directory: Path) -> Path:
    """A saved caption encoder (a 2-layer random Llama) as caption_contrastive writes it."""
    from tiny_pipeline import tiny_assets

    tiny_assets.make_llama(directory, causal_lm=False)
    (directory / "manifest.json").write_text(json.dumps({"stage": "caption_contrastive"}))
    return directory


def tiny_report(directory: Path, model: Path, score: float) -> Path:
    """An evaluate output for ``model`` (manifest + metrics.json) with ``PRIMARY`` = ``score``."""
    from llm2clip.contracts import contract
    from llm2clip.io import dir_fingerprint

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({PRIMARY: score, "other": score / 2}))
    manifest = {"stage": "evaluate", "format_version": contract("evaluate").format_version,
                "primary_metric": PRIMARY, "primary": score, "gate_passed": True, "protocol": "drill",
                "inputs": {"vision_model": dir_fingerprint(model)}, "metrics": "metrics.json"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def registry_view(uri: str, name: str) -> dict[str, Any]:
    """Every version of ``name`` (tags, aliases) and what each reader resolves, read afresh."""
    from mlflow.tracking import MlflowClient

    from llm2clip import registry

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {}
    for found in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, found.version)
        versions[str(full.version)] = {"tags": dict(full.tags), "aliases": sorted(full.aliases),
                                       "model_id": full.source.removeprefix("models:/")}
    champion = registry._champion(client, name) if versions else None
    return {"versions": versions, "champion": None if champion is None else str(champion.version),
            "champion_metrics": registry.champion_metrics(name, uri)}
