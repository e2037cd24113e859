"""The parts of a training loop every trainer shares.

A trainer owns its step (what a batch is, the forward, the loss); :class:`StepLoop` owns the rest:
the step counter, resuming from a checkpoint, the progress bar, logging window averages every
``log_every`` steps, and saving checkpoints every ``checkpoint_every`` steps with retention.
:func:`step_seed` makes every random draw of a step a pure function of ``(seed, step, rank)``,
so a resumed run sees exactly the data and dropout masks an uninterrupted one would have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2clip.config import TrainArgs
from llm2clip.train import checkpoint
from llm2clip.train.distributed import DistContext

log = logging.getLogger(__name__)

OnLog = Callable[[int, dict[str, float]], None]


def step_seed(seed: int, index: int, rank: int) -> int:
    """The seed of one (step or micro-batch ``index``, rank): data order and dropout derive from it."""
    return (seed * 1_000_003 + index * 7_919 + rank * 104_729) % (2**63 - 1)


class MetricsWindow:
    """Sums between two log points (open_clip's AverageMeter, one per logged value)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self) -> dict[str, float]:
        out = {k: v / max(1, self.count) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


class StepLoop:
    """Step counting, resume, progress, logging and checkpoints around a trainer's own step.

    Usage (every rank)::

        loop = StepLoop(engine, "caption_contrastive", total_steps, cfg, ctx, store, on_log)
        state = loop.resume(store.local)           # client state of the newest checkpoint, or None
        with loop:
            for step in range(loop.step + 1, total_steps + 1):
                ...                                 # forward, backward, engine.step()
                loop.end_step({"loss": loss, "lr": lr}, lambda: {"losses": losses})

    Checkpoints: every ``args.checkpoint_every`` steps, and at the last step when checkpoints are
    kept (``args.keep_checkpoints > 0``); the newest ``max(1, keep_checkpoints)`` stay.

    Args:
        engine: The DeepSpeed engine (saved and loaded).
        desc: Progress-bar label.
        total_steps: Optimizer steps of the run.
        args: The stage's shared training settings (``log_every``, checkpoint cadence/retention).
        ctx: The distributed context.
        store: Where checkpoints go (prepared with :func:`checkpoint.prepare_dir`); None: none.
        on_log: Called on rank 0 with ``(step, window averages)`` every ``log_every`` steps and at
            the last step.
    """

    def __init__(self, engine, desc: str, total_steps: int, args: TrainArgs, ctx: DistContext,
                 store: checkpoint.CheckpointStore | None = None, on_log: OnLog | None = None) -> None:
        self.engine, self.desc, self.total, self.args, self.ctx = engine, desc, total_steps, args, ctx
        self.store, self.on_log = store, on_log
        self.step = self.resumed_from = 0
        self.window = MetricsWindow()
        self.wall_time_s = 0.0
        self._bar = None
        self._started = 0.0

    def resume(self, source: Path | None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint in ``source`` (None: start fresh); its client state."""
        state = checkpoint.load_latest(self.engine, source) if source is not None else None
        if state:
            self.step = self.resumed_from = int(state["step"])
            log.info("resuming at step %d of %d", self.step + 1, self.total)
        return state

    def __enter__(self) -> StepLoop:
        from tqdm.auto import tqdm

        self.engine.train()
        self._bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step",
                         disable=not self.ctx.is_main, mininterval=2.0)
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self.wall_time_s = time.monotonic() - self._started

    def end_step(self, values: dict[str, float], client_state: Callable[[], dict[str, Any]]) -> None:
        """Count one optimizer step; log and checkpoint when due.

        Args:
            values: This step's scalars (the same on every rank); ``loss`` is shown on the bar,
                ``samples_per_second`` too when present.
            client_state: What a checkpoint carries besides the engine (``step`` is added).
        """
        self.step += 1
        self.window.add(values)
        self._bar.update(1)
        postfix = {"loss": f"{values['loss']:.4f}"}
        if "samples_per_second" in values:
            postfix["samples_s"] = f"{values['samples_per_second']:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        last = self.step == self.total
        if self.ctx.is_main and self.on_log is not None and (self.step % self.args.log_every == 0 or last):
            self.on_log(self.step, self.window.flush())
        every = self.args.checkpoint_every
        due = (every and self.step % every == 0 and not (last and self.args.keep_checkpoints == 0)) or (
            last and self.args.keep_checkpoints > 0)
        if self.store is not None and due:
            checkpoint.save(self.engine, self.store, self.step, {**client_state(), "step": self.step}, self.ctx,
                            keep=max(1, self.args.keep_checkpoints))
