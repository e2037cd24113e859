"""Tiny Hugging Face vision checkpoints built from configs (no hub), shared by the vision tests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from vision_tiny import CUSTOM_MEAN, CUSTOM_STD, TINY_TEXT, TINY_VISION


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A full ``CLIPModel`` dir (vision + text) with a preprocessor config and logit_scale ln 100."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_clip")
    model = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=16,
                                 logit_scale_init_value=math.log(100)))
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": CUSTOM_MEAN, "image_std": CUSTOM_STD, "crop_size": {"height": 32, "width": 32}}))
    return directory


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A full ``SiglipModel`` dir (vision + text)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("tiny_siglip")
    text = {k: v for k, v in TINY_TEXT.items() if not k.endswith("token_id")}
    SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=text)).save_pretrained(directory)
    return directory
