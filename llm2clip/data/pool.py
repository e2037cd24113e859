"""The process pool prepare_data runs its groups and shards in, and the order results come back in.

``workers`` processes are started with ``spawn`` (a fresh interpreter: nothing of the parent's
threads, MLflow client or open files is copied; each worker imports what it needs), or none at
all for ``workers: 1``, where :class:`InlineExecutor` runs every job in the calling process
through the same code path. :func:`ordered_map` hands out jobs and yields their results in job
order, whatever order the workers finish in, with a bounded number of jobs in flight, so the
parent's memory holds at most that many results. As with any ``spawn`` pool, a script that calls
``prepare_data.run`` needs the ``if __name__ == "__main__":`` guard (each worker imports the
main module again), or ``workers: 1``; the CLI, DVC and KFP entry points have it.

Log records a worker emits at WARNING and above travel back with its result
(:func:`captured_logs`) and are logged again in the parent in job order, so they reach the
stage's handlers (and pytest's ``caplog``) just as they would without workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

LogLine = tuple[str, int, str]  # (logger name, level, message)


def worker_count(workers: int) -> int:
    """``prepare_data.workers`` resolved: 0 = the cores this process may run on (its CPU affinity,
    and the container's CPU limit when there is one: a Kubernetes pod may see every core of its
    node but be allowed only ``resources.limits.cpu`` of them)."""
    if workers:
        return workers
    cores = len(os.sched_getaffinity(0))
    return min(cores, cpu_limit() or cores)


def cpu_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs the cgroup's CFS quota allows (rounded up), or None without a limit."""
    base = Path(root)
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (base / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1: the quota is -1 without a limit
            quota = (base / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (base / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


class InlineExecutor(Executor):
    """Runs each job at once in this process (one worker: no processes, no pickling)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # re-raised by future.result(), as a pool would
            future.set_exception(err)
        return future


def make_executor(workers: int) -> Executor:
    """An executor of ``workers`` spawned processes, or the inline one for ``workers == 1``."""
    if workers == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_forward_logs)


def ordered_map(executor: Executor, fn: Callable[[Any], Any], jobs: Iterable[Any], window: int) -> Iterator[Any]:
    """``fn(job)`` for every job, yielded in job order; at most ``window`` jobs submitted and not
    yet yielded. A job's exception is raised here, when its turn comes."""
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(executor.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------ log records


class _Collector(logging.Handler):
    """Keeps the WARNING+ records of a worker process until its current job returns them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelno, record.getMessage()))


_COLLECTOR: _Collector | None = None  # set in pool workers only


def _forward_logs() -> None:
    """Pool worker initializer: collect log records instead of printing them."""
    global _COLLECTOR
    _COLLECTOR = _Collector()
    logging.getLogger().addHandler(_COLLECTOR)


def captured_logs() -> list[LogLine]:
    """The records collected since the last call (none in the parent process)."""
    if _COLLECTOR is None:
        return []
    lines, _COLLECTOR.lines = _COLLECTOR.lines, []
    return lines


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No INFO or WARNING records in this process for the block: a worker opening a source again
    would repeat what the parent logged when it opened it to plan the groups."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def replay_logs(lines: list[LogLine]) -> None:
    """Log a worker's records again in this (the parent) process."""
    for name, level, message in lines:
        logging.getLogger(name).log(level, "%s", message)
