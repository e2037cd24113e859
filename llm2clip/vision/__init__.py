"""Vision side of LLM2CLIP: towers, the text adapter, the model, and image transforms."""

from llm2clip.vision.adapter import LinearBlock, TextAdapter
from llm2clip.vision.model import LLM2CLIPModel
from llm2clip.vision.towers import TOWER_KINDS, TowerSpec, VisionTower, build_tower
from llm2clip.vision.transforms import EvalTransform, Preprocess, TrainTransform, to_tensor_batch

__all__ = [
    "TOWER_KINDS", "EvalTransform", "LLM2CLIPModel", "LinearBlock", "Preprocess", "TextAdapter",
    "TowerSpec", "TrainTransform", "VisionTower", "build_tower", "to_tensor_batch",
]
