"""Zero-shot prompt templates: the OpenAI ImageNet ensemble, the paper's single template, presets.

``OPENAI_IMAGENET_TEMPLATES`` is the 80-prompt ensemble OpenAI published with CLIP, in the
notebook ``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` of ``github.com/openai/CLIP``
(``imagenet_templates``); LLM2CLIP's ``llm2clip/training/imagenet_zeroshot_data.py``
(``openai_imagenet_template``) and open_clip's ``zero_shot_metadata.py``
(``OPENAI_IMAGENET_TEMPLATES``) hold the same 80 prompts in the same order. LLM2CLIP (arXiv
2411.04997v6, Table 3) reports ImageNet zero-shot with this ensemble ("0-shot") and with the
single template ``a photo of the {classname}`` ("0-shot*"), which is :data:`SINGLE_TEMPLATE`
(one of the 80, so the 80-template prompt grid also yields the single-template number).

It sits with the config (no torch): eval_data resolves preset names through it, and the
evaluate harness reads the lists from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm2clip.config.base import ConfigError

#: The paper's single-template protocol (LLM2CLIP Table 3 "0-shot*": "a photo of the {classname}").
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of the {}.",)

#: The 80 OpenAI ImageNet prompt templates (CLIP's Prompt_Engineering_for_ImageNet.ipynb), in order.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: A short prompt ensemble in the OpenAI style (written for this project, not the 80-prompt list);
#: embed_captions' default when a data set names no templates.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a drawing of a {}.",
    "a painting of the {}.",
    "a sketch of a {}.",
    "a cartoon {}.",
    "a toy {}.",
    "an origami {}.",
    "a tattoo of a {}.",
    "an emoji of {}.",
    "a low resolution photo of the {}.",
    "a 3d rendering of a {}.",
)

#: Named template sets a config can ask for (``eval_data.<set>.zeroshot_preset``).
TEMPLATE_PRESETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "single": SINGLE_TEMPLATE,
}


def resolve_templates(preset: str, templates: Sequence[str] = ()) -> tuple[str, ...]:
    """The templates a config names: a preset's, else the explicit ones (maybe empty).

    Args:
        preset: A key of :data:`TEMPLATE_PRESETS`, or empty.
        templates: Explicit templates, used when ``preset`` is empty.

    Returns:
        The templates; ``()`` when neither is given (the caller's default applies).

    Raises:
        ConfigError: an unknown preset, both a preset and templates, or a template without
            exactly one ``{}``.
    """
    if preset and templates:
        raise ConfigError(f"zeroshot_preset {preset!r} and zeroshot_templates are both given; give one")
    if preset:
        if preset not in TEMPLATE_PRESETS:
            raise ConfigError(f"zeroshot_preset: {preset!r} is not one of {sorted(TEMPLATE_PRESETS)}")
        return TEMPLATE_PRESETS[preset]
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"zeroshot_templates: {t!r} must contain exactly one '{{}}'")
    return tuple(templates)
