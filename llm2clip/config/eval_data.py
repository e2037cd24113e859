"""``eval_data``: the evaluation sets (public benchmarks), prepared and embedded like the data.

Each entry of the ``eval_data`` section names one set: where its files are (any prepare_data
source kind, including the benchmark layouts: Karpathy JSON, long-caption sets, ImageNet,
caption tables), its caption fields and its zero-shot prompts. The SAME stage code prepares and
embeds it: ``prepare_data --eval-set NAME`` and ``embed_captions --eval-set NAME`` run with the
sections :func:`eval_set_sections` derives here, so DVC (``prepare_eval@NAME``,
``embed_eval@NAME``) and KFP (one ParallelFor iteration per set) cache each set on its own:
a new model re-scores a set without preparing or embedding it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llm2clip.config.base import ConfigError
from llm2clip.config.prepare_data import PrepareDataConfig, Source, ValidationConfig
from llm2clip.config.templates import resolve_templates

if TYPE_CHECKING:
    from llm2clip.config.common import CommonConfig
    from llm2clip.config.embed_captions import EmbedCaptionsConfig

EVAL_SPLIT = "test"
"""The one split a prepared evaluation set has."""

# Benchmarks are scored as published: nothing is cut or dropped for being long or oddly shaped.
EVAL_VALIDATION = ValidationConfig(min_captions=1, max_aspect_ratio=20.0, max_caption_chars=20_000)


@dataclass(frozen=True)
class EvalDataConfig:
    """One evaluation set (an entry of the ``eval_data`` section, keyed by its name).

    Attributes:
        caption_fields: Its caption fields, in order (COCO: ``[captions]``; long-caption sets:
            ``[long]``; a cross-lingual set: ``[zh]``); empty for a labelled image set
            (ImageNet), which has only zero-shot metrics.
        sources: Where its samples come from: any prepare_data source kind.
        shard_size: Samples per shard.
        image_max_side: Images are stored with the long side at most this (>= the largest model
            input, 336 for the paper's models).
        jpeg_quality: Quality of the re-encoded jpg.
        validation: Per-sample checks; the defaults keep every readable sample of a benchmark
            (quarantined samples are counted in the manifest and the report).
        zeroshot_preset: Class prompts of a labelled set: ``openai_imagenet`` (the 80 OpenAI
            ImageNet templates; the single-template metric is reported beside them),
            ``single`` (one template), or empty: ``zeroshot_templates``, else
            embed_captions' own templates.
        zeroshot_templates: Explicit prompt templates (one ``{}`` each) when no preset is named.
    """

    caption_fields: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    shard_size: int = 1000
    image_max_side: int = 512
    jpeg_quality: int = 95
    validation: ValidationConfig = EVAL_VALIDATION
    zeroshot_preset: str = ""
    zeroshot_templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("eval_data: every evaluation set needs at least one source")
        if len(set(self.caption_fields)) != len(self.caption_fields):
            raise ConfigError(f"eval_data: duplicate caption field names in {list(self.caption_fields)}")
        if self.zeroshot_preset and self.zeroshot_templates:
            raise ConfigError("eval_data: give zeroshot_preset or zeroshot_templates, not both")
        for t in self.zeroshot_templates:
            if t.count("{}") != 1:
                raise ConfigError(f"eval_data.zeroshot_templates: {t!r} must contain exactly one '{{}}'")


def check_names(eval_data: dict[str, EvalDataConfig], eval_sets: tuple[Any, ...] | None = None) -> None:
    """Eval set names are DVC stage keys and folder names; evaluate may only name existing ones.

    Args:
        eval_sets: ``evaluate.eval_sets`` when the whole params file is known (not for one
            stage's sections, as a KFP task gets them).

    Raises:
        ConfigError: a name DVC or a path cannot carry, or an ``evaluate.eval_sets[].eval_data``
            that no ``eval_data`` entry defines.
    """
    import re

    for name in eval_data:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ConfigError(f"eval_data.{name}: a set name is letters, digits, '_' and '-' (it names a "
                              "folder and a DVC stage)")
    for s in eval_sets or ():
        if s.eval_data and s.eval_data not in eval_data:
            raise ConfigError(f"evaluate.eval_sets[{s.name}].eval_data: no eval_data entry {s.eval_data!r} "
                              f"(defined: {sorted(eval_data) or 'none'})")


def eval_set_sections(name: str, spec: EvalDataConfig, common: CommonConfig,
                      embed: EmbedCaptionsConfig) -> tuple[CommonConfig, PrepareDataConfig, EmbedCaptionsConfig]:
    """The ``(common, prepare_data, embed_captions)`` sections that prepare and embed set ``name``.

    ``common`` keeps everything but its caption fields (the set's own); prepare_data writes one
    ``test`` split recording the set's name; embed_captions embeds the set's class prompts (the
    resolved templates) for that split when the set is labelled.
    """
    set_common = dataclasses.replace(common, caption_fields=spec.caption_fields)
    prepare = PrepareDataConfig(sources=spec.sources, val_fraction=0.0, shard_size=spec.shard_size,
                                image_max_side=spec.image_max_side, jpeg_quality=spec.jpeg_quality,
                                validation=spec.validation, eval_set=name)
    templates = resolve_templates(spec.zeroshot_preset, spec.zeroshot_templates) or embed.zeroshot_templates
    set_embed = dataclasses.replace(embed, zeroshot_splits=(EVAL_SPLIT,), zeroshot_templates=tuple(templates))
    return set_common, prepare, set_embed
