"""Small helpers over Hugging Face ``transformers`` APIs that both model families use."""

from __future__ import annotations

from typing import Any


def set_activation_checkpointing(model: Any, enable: bool = True) -> None:
    """Non-reentrant activation (gradient) checkpointing on a ``PreTrainedModel``, on or off.

    Non-reentrant works with frozen inputs, LoRA and DeepSpeed without a ``requires_grad`` hack.
    transformers 5.24 (our pin) names it ``activation_checkpointing_enable`` and deprecates the
    old ``gradient_checkpointing_enable``; older releases (e.g. 5.17 on a lent GPU machine) only
    have the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
