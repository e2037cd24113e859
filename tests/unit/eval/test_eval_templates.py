"""Zero-shot templates: the 80 OpenAI ImageNet prompts, the single template, the presets, and the
two zero-shot numbers (all templates vs the single template's column) on a hand-checked grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2clip.config.base import ConfigError
from llm2clip.config.templates import (
    DEFAULT_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    SINGLE_TEMPLATE,
    TEMPLATE_PRESETS,
    resolve_templates,
)
from llm2clip.data import sidecars
from llm2clip.eval import zeroshot
from llm2clip.eval.harness import EmbeddedSet, _attach_zeroshot, set_metrics


def test_the_openai_imagenet_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    # spot checks against the notebook's list (first, last, and the odd ones)
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert {"itap of my {}.", "a {} in a video game.", "a origami {}.", "a embroidered {}."} <= set(
        OPENAI_IMAGENET_TEMPLATES)
    # the paper's single template is one of the 80, so the 80-prompt grid holds its column
    assert SINGLE_TEMPLATE == ("a photo of the {}.",) and SINGLE_TEMPLATE[0] in OPENAI_IMAGENET_TEMPLATES


def test_one_definition_of_each_list():
    assert zeroshot.SINGLE_TEMPLATE is SINGLE_TEMPLATE and zeroshot.DEFAULT_TEMPLATES is DEFAULT_TEMPLATES


def test_presets_resolve():
    assert set(TEMPLATE_PRESETS) == {"openai_imagenet", "single"}
    assert resolve_templates("openai_imagenet") == OPENAI_IMAGENET_TEMPLATES
    assert resolve_templates("single", ()) == SINGLE_TEMPLATE
    assert resolve_templates("", ("a {} here.",)) == ("a {} here.",)
    assert resolve_templates("", ()) == ()
    with pytest.raises(ConfigError, match=r"'imagenet80' is not one of \['openai_imagenet', 'single'\]"):
        resolve_templates("imagenet80")
    with pytest.raises(ConfigError, match="give one"):
        resolve_templates("single", ("a {}.",))
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_templates("", ("no slot",))


class IdentityAdapter:
    """A model whose adapter is the identity (then L2-normalised), as far as the harness asks."""

    llm_dim = 2

    def encode_text_embeddings(self, x):
        return F.normalize(torch.as_tensor(x).float(), dim=-1)


def grid_80() -> np.ndarray:
    """(2 classes, 80 templates, 2): class 0 is (1, 0) under every template but the single one, where
    it is (0, 1); class 1 the other way round. So the 80-template class embeddings point one way and
    the single template's the other."""
    single = OPENAI_IMAGENET_TEMPLATES.index(SINGLE_TEMPLATE[0])
    grid = np.zeros((2, 80, 2), dtype=np.float32)
    grid[0, :, 0] = 1.0
    grid[1, :, 1] = 1.0
    grid[0, single], grid[1, single] = (0.0, 1.0), (1.0, 0.0)
    return grid


def test_all_templates_and_the_single_template_disagree_as_worked_out_by_hand(tmp_path):
    entry = sidecars.write_zeroshot(tmp_path, "test", ["cat", "dog"], list(OPENAI_IMAGENET_TEMPLATES), grid_80(),
                                    {"split": "test"})
    # three images: (1, 0) is a cat, (0, 1) a dog, and (1, 0) again, but labelled dog
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    embedded = EmbeddedSet(image_emb=images, labels=["cat", "dog", "dog"])
    _attach_zeroshot(embedded, IdentityAdapter(), str(tmp_path), {"zeroshot": {"test": entry}}, "test", "")
    assert embedded.templates == list(OPENAI_IMAGENET_TEMPLATES) and embedded.classnames == ["cat", "dog"]
    metrics, _ = set_metrics(embedded, "imagenet")
    # 80 templates: cat = normalize(79, 1), dog = normalize(1, 79): images 0 and 1 right, image 2 wrong
    assert metrics["imagenet.zeroshot.top1"] == pytest.approx(2 / 3)
    # the single template alone: cat = (0, 1), dog = (1, 0): only image 2 is right
    assert metrics["imagenet.zeroshot_single.top1"] == pytest.approx(1 / 3)
    assert metrics["imagenet.zeroshot.top5"] == metrics["imagenet.zeroshot_single.top5"] == 1.0  # capped at 2
    assert metrics["imagenet.zeroshot.templates"] == 80.0
    assert json.loads((tmp_path / entry["meta"]).read_text())["templates"][0] == "a bad photo of a {}."


def test_no_single_template_metric_when_it_was_not_embedded(tmp_path):
    templates = ["a drawing of a {}.", "a toy {}."]
    grid = np.stack([np.tile([1.0, 0.0], (2, 1)), np.tile([0.0, 1.0], (2, 1))]).astype(np.float32)
    entry = sidecars.write_zeroshot(tmp_path, "test", ["cat", "dog"], templates, grid, {})
    embedded = EmbeddedSet(image_emb=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), labels=["cat", "dog"])
    _attach_zeroshot(embedded, IdentityAdapter(), str(tmp_path), {"zeroshot": {"test": entry}}, "test", "")
    metrics, _ = set_metrics(embedded, "demo")
    assert embedded.single_class_emb is None and metrics["demo.zeroshot.top1"] == 1.0
    assert not any(k.startswith("demo.zeroshot_single.") for k in metrics)
