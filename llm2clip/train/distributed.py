"""Distributed helpers shared by every trainer: init, rank/world, gather *with* gradient.

Launch with ``torchrun --nproc-per-node N -m llm2clip <stage> ...`` (or the ``deepspeed``
launcher); a plain ``python -m llm2clip <stage>`` runs as a world of one. On CPU the backend is
gloo (no oneCCL), on GPU nccl.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
R = TypeVar("R")

_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (rendezvous for local process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistContext:
    """What :func:`init_distributed` set up; :meth:`shutdown` undoes exactly that.

    Attributes:
        rank: Global rank of this process.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        device: ``cuda:<local_rank>`` on GPU machines, else ``cpu``.
        owns_group: True when this call created the process group (so it also destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    _env_set: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the group if we created it and drop the env vars the fallback set."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            _forget_deepspeed_groups()
        for name in self._env_set:
            os.environ.pop(name, None)
        self.owns_group, self._env_set = False, ()


# DeepSpeed keeps sub-groups of the process group in module globals (``deepspeed.utils.groups``).
_DEEPSPEED_GROUPS = ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP")
_DEEPSPEED_GROUP_TABLES = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                           "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached sub-groups with the group they belong to.

    Otherwise the next engine built in this process (a second stage run, a test after another)
    reuses a clone of the destroyed group and fails with "Group ... is not registered".
    """
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in _DEEPSPEED_GROUPS:
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in _DEEPSPEED_GROUP_TABLES:
        table = getattr(groups, name, None)
        if isinstance(table, dict):
            table.clear()


def extensions_root() -> Path:
    """Where torch's JIT op loader builds (``$TORCH_EXTENSIONS_DIR``, else its per-Python default)."""
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"


@contextlib.contextmanager
def extension_build_guard(root: Path | None = None) -> Iterator[None]:
    """Hold an flock on ``<root>/llm2clip.flock`` while a JIT op loads; remove its stale lock files.

    torch's loader guards each op's build (and its up-to-date check, on every start) with a lock
    *file*, ``<root>/<op>/lock``, and waits with no end while one exists. A process killed inside
    that window (a preempted pod, a SIGKILL) leaves it behind, and from then on every start of a
    DeepSpeed stage hangs silently. Every llm2clip process loads ops only inside this guard, and the
    kernel drops an flock when its holder dies; so a lock file found while holding the flock was
    left by a dead loader, and is removed (with a warning). Another program building torch
    extensions in the same folder at the same moment is not guarded: give it its own
    ``TORCH_EXTENSIONS_DIR``.
    """
    root = root or extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "llm2clip.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            for stale in root.glob("*/lock"):
                log.warning("removing %s: left by a process killed while loading that op "
                            "(torch would wait for it forever)", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def init_distributed(backend: str | None = None, *, deepspeed: bool = True) -> DistContext:
    """Join (or create) the process group.

    Under a launcher (``RANK``/``WORLD_SIZE`` set) every rank joins it. Without one, the
    launcher variables are set for a world of one, because DeepSpeed otherwise falls back to
    MPI discovery (``mpi4py`` missing). An existing group is reused and not destroyed later.

    Args:
        backend: ``gloo``/``nccl``; default nccl with CUDA, else gloo.
        deepspeed: Initialise through ``deepspeed.init_distributed`` (what its engine expects);
            False uses plain ``torch.distributed`` (tests, tools without DeepSpeed).

    Returns:
        The context; call ``shutdown()`` when done.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    env_set: list[str] = []
    if "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())}
        for name in _LAUNCHER_ENV:
            if name not in os.environ:
                os.environ[name] = defaults[name]
                env_set.append(name)
    owns = not dist.is_initialized()
    if owns:
        if deepspeed:
            import deepspeed as ds
            from deepspeed.comm.torch import build_shm_op

            # DeepSpeed JIT-loads its shm op (CPU) inside init_distributed, after the rendezvous:
            # load it first, under the guard and alone (DeepSpeed keeps the module: its own load
            # then takes no lock file). The rendezvous must stay outside, or ranks deadlock.
            with extension_build_guard():
                build_shm_op()
            ds.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, tuple(env_set))
    log.info("rank %d/%d on %s (%s)", ctx.rank, ctx.world_size, device, backend)
    return ctx


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (detached) tensor; the tensor itself without a group."""
    if get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of *its* slice, summed over ranks.

    Every rank computes its own loss from the gathered tensor, so the gradient w.r.t. a rank's
    local tensor is the sum of what every rank's loss says about that slice (all_reduce SUM,
    then slice). DeepSpeed then averages parameter gradients, which gives exactly the gradient
    of the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_sizes(n: int, device: torch.device | None = None) -> tuple[int, ...]:
    """Every rank's local batch size (rank order)."""
    if get_world_size() == 1:
        return (n,)
    local = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(parts, local)
    return tuple(int(p.item()) for p in parts)


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph.

    Local sizes may differ between ranks (a ragged last batch).

    Args:
        tensor: ``(n_local, *)`` on this rank.

    Returns:
        ``(gathered, offset)``: gathered is ``(sum of n over ranks, *)`` in rank order and
        ``offset`` is where this rank's rows start in it (to build the labels).
    """
    if get_world_size() == 1:
        return tensor, 0
    sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes), sum(sizes[: get_rank()])


def run_on_every_rank(stage: str, cfg: Any, common: Any, *, inputs: dict[str, str], pipeline_run_id: str,
                      body: Callable[[DistContext, Any], R]) -> R:
    """The ``run()`` of a stage that trains on every rank: join (or start) the process group,
    track on rank 0 only, run ``body(ctx, tracker)`` everywhere, hand rank 0's result to every
    rank, leave the group.

    Args:
        stage: The stage name (the MLflow run's name).
        cfg, common: The stage's config and ``common`` (logged as params on rank 0).
        inputs: Input name -> location (their lineage is logged).
        pipeline_run_id: Tag joining the runs of one pipeline run.
        body: The stage's work; returns the result on rank 0 (other ranks may return None).
    """
    import contextlib

    from llm2clip.tracking import Tracker, stage_run

    ctx = init_distributed()
    try:
        tracking = (stage_run(stage, cfg, common, inputs=inputs, pipeline_run_id=pipeline_run_id)
                    if ctx.is_main else contextlib.nullcontext(Tracker()))
        with tracking as tracker:
            result = [body(ctx, tracker)]
        if ctx.world_size > 1:
            dist.broadcast_object_list(result, src=0)  # rank 0 measured what the result reports
        return result[0]
    finally:
        ctx.shutdown()
