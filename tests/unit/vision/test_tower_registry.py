"""A tower kind is one row of ``llm2clip.tower_kinds.TOWERS``: config, build_tower and serving read it.

The fixture adds a kind the way docs/extending.md says (a ``VisionTower`` subclass and one
``register_tower`` call, nothing else); config validation, ``build_tower``, the model and the
registry's serving requirements then know it.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
from torch import nn

from llm2clip import registry, tower_kinds
from llm2clip.config import ConfigError, TrainVisionConfig, from_dict
from llm2clip.vision.model import LLM2CLIPModel
from llm2clip.vision.towers import TowerSpec, VisionTower, build_tower
from llm2clip.vision.transforms import HALF, Preprocess

KIND = "mean_colour"


class MeanColourTower(VisionTower):
    """The tiniest tower: ``(B, 3, S, S)`` -> mean colour -> ``Linear(3, 8)``."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.width = 8
        self.preprocess = Preprocess(spec.image_size or 16, HALF, HALF)
        self.proj = nn.Linear(3, self.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.mean(dim=(2, 3)))

    @property
    def num_layers(self) -> int:
        return 1

    def layer_id(self, name: str) -> int:
        return self.num_layers + 1

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        pass

    def export_spec(self) -> TowerSpec:
        return self.spec


@pytest.fixture
def new_kind():
    kind = tower_kinds.register_tower(KIND, MeanColourTower, requirements=("PyYAML",), default_loss="siglip")
    yield kind
    del tower_kinds.TOWERS[KIND]


def train_vision(**values) -> TrainVisionConfig:
    return from_dict(TrainVisionConfig, values, "train_vision")


def test_a_registered_kind_is_known_to_config_builder_and_serving(new_kind, tmp_path):
    cfg = train_vision(tower=KIND, image_size=12)
    assert new_kind.default_loss == "siglip"

    tower = build_tower(cfg.tower_spec())
    assert isinstance(tower, MeanColourTower) and tower.preprocess.image_size == 12
    assert tower(torch.randn(2, 3, 12, 12)).shape == (2, 8)

    model = LLM2CLIPModel.build(cfg.tower_spec(), llm_dim=4, embed_dim=6)
    loaded = LLM2CLIPModel.from_pretrained(model.save_pretrained(tmp_path / "model"))
    assert isinstance(loaded.tower, MeanColourTower)

    assert f"PyYAML=={version('PyYAML')}" in registry.pip_requirements(KIND)


def test_a_registered_kind_keeps_the_table_rules(new_kind):
    with pytest.raises(ConfigError, match="train_vision.tower_path: only clip/siglip/eva02 towers load a directory"):
        train_vision(tower=KIND, tower_path="/models/x")
    with pytest.raises(ValueError, match=f"tower kind '{KIND}' takes no path"):
        TowerSpec(kind=KIND, path="/models/x")
    with pytest.raises(ValueError, match="exists; pass replace=True"):
        tower_kinds.register_tower(KIND, MeanColourTower)
    with pytest.raises(ConfigError, match=rf"must be one of \[.*'{KIND}'\], got 'resnet'"):
        train_vision(tower="resnet")


def test_unknown_kinds_are_errors_that_list_the_known_ones():
    known = "['clip', 'siglip', 'efficientnet_lite0', 'vit_scratch', 'eva02']"
    with pytest.raises(ConfigError) as err:
        train_vision(tower=KIND)
    assert str(err.value) == f"train_vision.tower: must be one of {known}, got '{KIND}'"
    for fail in (lambda: build_tower({"kind": KIND}), lambda: registry.pip_requirements(KIND)):
        with pytest.raises(ValueError, match=f"unknown vision tower kind '{KIND}'; expected one of"):
            fail()


def test_the_built_in_rows():
    table = tower_kinds.TOWERS
    assert list(table) == ["clip", "siglip", "efficientnet_lite0", "vit_scratch", "eva02"]
    assert tower_kinds.directory_kinds() == ["clip", "siglip", "eva02"]
    assert {k: v.default_loss for k, v in table.items()} == {
        "clip": "clip", "siglip": "siglip", "efficientnet_lite0": "clip", "vit_scratch": "clip", "eva02": "clip"}
    assert [p.split("==")[0] for p in registry.pip_requirements("efficientnet_lite0")][-1] == \
        "efficientnet-lite-pytorch"
    assert registry.pip_requirements("clip") == registry.pip_requirements("")


def test_config_reads_the_table_without_torch():
    code = ("import sys, llm2clip.config\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'llm2clip.vision') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
