"""DeepSpeed engine construction and crash-safe, resumable checkpoints.

Checkpoint layout (one dir per run)::

    ckpt/run.json          what the checkpoints belong to (config hash, world size, ...)
    ckpt/step00000040/     a complete DeepSpeed checkpoint (every rank's shard)
    ckpt/latest            the name of the newest complete one (written atomically)

A save goes to ``tmp-stepN`` first; only when every rank has written its files (DeepSpeed's own
barrier) does rank 0 rename it to ``stepN`` and then replace ``latest``. A kill at any moment
leaves ``latest`` pointing at a complete checkpoint; leftover ``tmp-*`` dirs are removed on the
next start. Frozen (non-LoRA) weights are not saved: they come from the base model again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from llm2clip.io import atomic_write_json, atomic_write_text
from llm2clip.train.distributed import DistContext

log = logging.getLogger(__name__)

LATEST = "latest"
RUN_FILE = "run.json"


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """LR factor: 0 -> 1 over ``warmup`` steps, then linearly to 0 at ``total`` (HF "linear")."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, ds_config: dict[str, Any]):
    """A DeepSpeed engine over the trainable parameters of ``model``.

    The optimizer is a plain ``torch.optim.AdamW`` given to DeepSpeed as a client optimizer, so
    no fused op is JIT-compiled; the warmup/decay scheduler is stepped (and checkpointed) by it.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = linear_warmup_decay(optimizer, min(warmup_steps, max_steps), max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine


def prepare_dir(ckpt_dir: Path, identity: dict[str, Any], ctx: DistContext) -> None:
    """Make ``ckpt_dir`` usable: wipe it if it belongs to another run, drop half-written saves."""
    if ctx.is_main:
        run_file = ckpt_dir / RUN_FILE
        if run_file.is_file() and json.loads(run_file.read_text()) != identity:
            log.warning("%s holds checkpoints of a different run (config/world size); starting over",
                        ckpt_dir)
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_json(run_file, identity)
    ctx.barrier()


def latest_tag(ckpt_dir: Path) -> str | None:
    """Name of the newest complete checkpoint, or None."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], ctx: DistContext,
         keep: int = 2) -> None:
    """Atomic checkpoint of ``engine`` at ``step`` (call on every rank)."""
    tmp, final = f"tmp-step{step:08d}", f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tmp, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)  # ends with a barrier: all shards written
    if ctx.is_main:
        shutil.rmtree(ckpt_dir / final, ignore_errors=True)
        (ckpt_dir / tmp).rename(ckpt_dir / final)
        atomic_write_text(ckpt_dir / LATEST, final)
        for old in sorted(ckpt_dir.glob("step*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved", ckpt_dir / final)
    ctx.barrier()


def load_latest(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Load the newest complete checkpoint into ``engine``; its client state, or None if none.

    Note: DeepSpeed's loader unpickles its own files (``torch.load(weights_only=False)``); only
    point it at checkpoint dirs this code wrote.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state or {}
