"""The whole params file: ``common`` plus one section per stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm2clip.config.caption_contrastive import CaptionContrastiveConfig
from llm2clip.config.common import CommonConfig
from llm2clip.config.embed_captions import EmbedCaptionsConfig
from llm2clip.config.evaluate import EvaluateConfig, RegisterConfig
from llm2clip.config.prepare_data import PrepareDataConfig
from llm2clip.config.train_vision import TrainVisionConfig


@dataclass(frozen=True)
class Params:
    """The whole params file: ``common`` plus one section per stage."""

    common: CommonConfig = CommonConfig()
    prepare_data: PrepareDataConfig = PrepareDataConfig()
    caption_contrastive: CaptionContrastiveConfig = CaptionContrastiveConfig()
    embed_captions: EmbedCaptionsConfig = EmbedCaptionsConfig()
    train_vision: TrainVisionConfig = TrainVisionConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()

    def section(self, name: str) -> Any:
        """The config of stage ``name``."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples become lists); ``from_dict`` round-trips it."""
        from llm2clip.config.loader import to_dict

        return to_dict(self)
