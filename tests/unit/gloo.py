"""Run a test function on 2 real gloo ranks (spawned processes) and collect what each saved."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from llm2clip.train.distributed import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, folder: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from llm2clip.train.distributed import init_distributed

    ctx = init_distributed("gloo", deepspeed=False)
    try:
        torch.save(fn(rank, world, *args), f"{folder}/rank{rank}.pt")
        # No rank tears the group down while another is still in a collective: gloo aborts the
        # process (SIGABRT) when a peer closes mid-operation (seen once in a clean-clone run).
        torch.distributed.barrier()
    finally:
        gc.collect()  # drop autograd graphs that still hold gloo work before the group goes
        ctx.shutdown()
    # A spawned child otherwise runs interpreter finalization, where gloo's C++ worker threads
    # can still own tensors with Python references: destroying them then aborts the process
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291). The
    # rank's result is saved and the group destroyed, so nothing is left for finalization to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, folder: Path, *args, world: int = 2) -> list[dict]:
    """``fn(rank, world, *args)`` on each rank of a gloo group; returns each rank's result.

    ``fn`` must be a module-level function (spawned processes import it) returning tensors.
    """
    mp.start_processes(_entry, args=(world, free_port(), fn, str(folder), args), nprocs=world,
                       start_method="spawn")
    return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(world)]
