"""Typed configuration: one frozen dataclass per params.yaml section, one module per section.

``params.yaml`` has a ``common`` section and one section per stage. Loading validates the whole
file: an unknown key, a wrong type or a bad value is a :class:`ConfigError` that names the key
(``prepare_data.sources[0].count: expected int, got 'many'``). ``--set section.key=value``
overrides are applied to the raw mapping *before* validation, so they get the same checks.

Where things are: ``common.py``, ``prepare_data.py`` (sources, validation), ``training.py``
(:class:`TrainArgs`, the fields both trainers share), ``caption_contrastive.py``,
``embed_captions.py``, ``train_vision.py``, ``evaluate.py`` (evaluate + register), ``eval_data.py`` (the
evaluation sets and the sections that prepare them),
``params.py`` (the whole file) and ``loader.py`` (mapping -> dataclasses, overrides, hashes).
Everything is importable from ``llm2clip.config``.

Derived configurations (DeepSpeed JSON, LoRA config, ...) are computed from these classes by the
code that needs them; they are never kept as second files.
"""

from llm2clip.config.base import ConfigError, check_bounds
from llm2clip.config.benchmarks import (
    BenchmarkSource,
    CaptionTableSource,
    ImageNetSource,
    KarpathySource,
    LongCaptionSource,
)
from llm2clip.config.caption_contrastive import LLAMA_LINEAR_PROJECTIONS, CaptionContrastiveConfig
from llm2clip.config.common import CommonConfig
from llm2clip.config.embed_captions import EmbedCaptionsConfig
from llm2clip.config.eval_data import EVAL_SPLIT, EvalDataConfig, eval_set_sections
from llm2clip.config.evaluate import EvalSet, EvaluateConfig, RegisterConfig
from llm2clip.config.loader import (
    apply_overrides,
    config_hash,
    from_dict,
    load_params,
    load_sections,
    read_yaml_mapping,
    to_dict,
)
from llm2clip.config.params import Params
from llm2clip.config.prepare_data import (
    DvcSource,  # from llm2clip.config.dvc_source, which prepare_data imports after the kinds it wraps
    EmojiSource,
    ManifestSource,
    PrepareDataConfig,
    Source,
    SyntheticSource,
    ValidationConfig,
    WebDatasetSource,
)
from llm2clip.config.train_vision import TrainVisionConfig
from llm2clip.config.training import TrainArgs, stage_defaults

__all__ = [
    "LLAMA_LINEAR_PROJECTIONS",
    "BenchmarkSource",
    "CaptionContrastiveConfig",
    "CaptionTableSource",
    "CommonConfig",
    "ConfigError",
    "DvcSource",
    "EmbedCaptionsConfig",
    "EVAL_SPLIT",
    "EmojiSource",
    "EvalDataConfig",
    "EvalSet",
    "EvaluateConfig",
    "ImageNetSource",
    "KarpathySource",
    "LongCaptionSource",
    "ManifestSource",
    "Params",
    "PrepareDataConfig",
    "RegisterConfig",
    "Source",
    "SyntheticSource",
    "TrainArgs",
    "TrainVisionConfig",
    "ValidationConfig",
    "WebDatasetSource",
    "apply_overrides",
    "check_bounds",
    "config_hash",
    "eval_set_sections",
    "from_dict",
    "load_params",
    "load_sections",
    "read_yaml_mapping",
    "stage_defaults",
    "to_dict",
]
