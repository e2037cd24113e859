"""The whole params file: ``common``, one section per stage, and the evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm2clip.config.base import ConfigError
from llm2clip.config.caption_contrastive import CaptionContrastiveConfig
from llm2clip.config.common import CommonConfig
from llm2clip.config.embed_captions import EmbedCaptionsConfig
from llm2clip.config.eval_data import EvalDataConfig, check_names, eval_set_sections
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
    eval_data: dict[str, EvalDataConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_names(self.eval_data)

    def eval_set(self, name: str, stage: str) -> tuple[Any, CommonConfig]:
        """``(stage config, common)`` that run ``stage`` (prepare_data or embed_captions) on eval set ``name``.

        Raises:
            ConfigError: no such eval set, or a stage that does not run per eval set.
        """
        if name not in self.eval_data:
            raise ConfigError(f"--eval-set {name}: no such entry in eval_data (defined: "
                              f"{sorted(self.eval_data) or 'none'})")
        common, prepare, embed = eval_set_sections(name, self.eval_data[name], self.common, self.embed_captions)
        per_stage = {"prepare_data": prepare, "embed_captions": embed}
        if stage not in per_stage:
            raise ConfigError(f"--eval-set: only prepare_data and embed_captions run per eval set, not {stage}")
        return per_stage[stage], common

    def section(self, name: str) -> Any:
        """The config of stage ``name``."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples become lists); ``from_dict`` round-trips it."""
        from llm2clip.config.loader import to_dict

        return to_dict(self)
