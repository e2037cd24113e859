"""Crash-safe, resumable DeepSpeed checkpoints, in a directory or on S3.

Checkpoint layout (one dir per run)::

    ckpt/run.json          what the checkpoints belong to (config hash, world size, ...)
    ckpt/step00000040/     a complete DeepSpeed checkpoint (every rank's shard)
    ckpt/latest            the name of the newest complete one (written atomically)

A save goes to ``tmp-stepN`` first; only when every rank has written its files (DeepSpeed's own
barrier) does rank 0 rename it to ``stepN`` and then replace ``latest``. A kill at any moment
leaves ``latest`` pointing at a complete checkpoint; leftover ``tmp-*`` dirs are removed on the
next start. Frozen (non-LoRA) weights are not saved: they come from the base model again.

Where checkpoints live is a :class:`CheckpointStore`: a directory every rank sees (one machine,
or a ReadWriteMany volume), or an ``s3://`` prefix. On S3 no filesystem is shared, which is what
a multi-node TrainJob on a preemptible cluster has: DeepSpeed writes into a node-local staging
dir, the first process of each node uploads what its ranks wrote, and only then does rank 0 put
``latest`` (one S3 PUT, the commit mark). A restarted job downloads the newest committed
checkpoint into each node's staging dir before it resumes; steps newer than ``latest`` (a save
that was cut off) are deleted.

S3 requests are retried by botocore (``llm2clip.io.S3_RETRIES``). A store that still fails after
the retries (error answers, dropped connections, an endpoint that is gone) ends the stage with a
:class:`~llm2clip.io.StageError` that says which checkpoint did not land; ``latest`` is never moved
to a checkpoint whose upload failed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip.io import StageError, atomic_write_json, atomic_write_text, is_remote, s3_filesystem
from llm2clip.train.distributed import DistContext

log = logging.getLogger(__name__)

LATEST = "latest"
RUN_FILE = "run.json"


def _is_store_failure(err: BaseException) -> bool:
    """An S3 request that failed after the retries: s3fs's ``OSError``, or botocore's own error
    (a dropped connection is ``ConnectionClosedError``, a gone endpoint ``EndpointConnectionError``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(err, (OSError, BotoCoreError, ClientError))


@contextlib.contextmanager
def _store_failure(what: str, then: str) -> Iterator[None]:
    """Turn a store that kept failing into one StageError line: ``what (the error): then``."""
    try:
        yield
    except Exception as err:
        if not _is_store_failure(err):
            raise
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise StageError(f"{what} ({reason}): {then}") from err


@dataclass(frozen=True)
class CheckpointStore:
    """Where one run's checkpoints live.

    Attributes:
        local: The directory DeepSpeed reads and writes (the store itself, or a node-local
            staging copy of ``remote``).
        remote: ``s3://`` prefix of the store; empty for a directory every rank sees.
        endpoint_url: S3 endpoint (MinIO, moto); empty: the AWS default / ``$AWS_ENDPOINT_URL``.
    """

    local: Path
    remote: str = ""
    endpoint_url: str = ""

    @classmethod
    def at(cls, location: str | Path, endpoint_url: str = "") -> CheckpointStore:
        """A store at a local directory or an ``s3://`` prefix (staged under ``$TMPDIR``)."""
        if not is_remote(location):
            return cls(Path(location))
        remote = str(location).rstrip("/")
        key = hashlib.sha256(remote.encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / "llm2clip-checkpoints" / key, remote, endpoint_url)

    def _fs(self):
        fs = s3_filesystem(self.endpoint_url)
        fs.invalidate_cache()  # other nodes write here too: never trust a cached listing
        return fs

    def push(self, name: str) -> None:
        """Upload ``local/name`` (a file or a folder) to ``remote/name``; nothing for a local store."""
        if not self.remote:
            return
        source, fs = self.local / name, self._fs()
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            fs.put_file(str(path), f"{self.remote}/{path.relative_to(self.local).as_posix()}")

    def pull(self) -> None:
        """Fill the staging dir with the remote's committed state: ``run.json``, the checkpoint
        ``latest`` names, and the other saved entries (not older or unfinished steps); ``latest``
        itself last, so a pull that fails half-way leaves no staged checkpoint that looks complete."""
        fs = self._fs()
        self.local.mkdir(parents=True, exist_ok=True)
        if not fs.exists(self.remote):
            return
        latest = fs.cat(f"{self.remote}/{LATEST}").decode().strip() if fs.exists(f"{self.remote}/{LATEST}") else ""
        for entry in fs.ls(self.remote, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name == LATEST or (name.startswith(("step", "tmp-")) and name != latest):
                continue
            target = self.local / name
            if fs.isdir(entry):
                fs.get(entry.rstrip("/") + "/", str(target) + "/", recursive=True)
            else:
                fs.get_file(entry, str(target))
        if latest:
            atomic_write_text(self.local / LATEST, latest)

    def remove(self) -> None:
        """Delete the whole store (the staging copy and the remote prefix)."""
        shutil.rmtree(self.local, ignore_errors=True)
        if self.remote:
            with _store_failure(f"could not delete the checkpoint store {self.remote}",
                                "check the S3 endpoint, then run the stage again"):
                fs = self._fs()
                if fs.exists(self.remote):
                    fs.rm(self.remote, recursive=True)


def _prepare_remote(store: CheckpointStore, identity: dict[str, Any]) -> None:
    """Rank 0: wipe a remote store of another run, drop steps newer than ``latest``, write run.json."""
    fs = store._fs()
    run_file = f"{store.remote}/{RUN_FILE}"
    if fs.exists(run_file) and json.loads(fs.cat(run_file)) != identity:
        log.warning("%s holds checkpoints of a different run (config/world size); starting over", store.remote)
        fs.rm(store.remote, recursive=True)
    latest = fs.cat(f"{store.remote}/{LATEST}").decode().strip() if fs.exists(f"{store.remote}/{LATEST}") else ""
    if fs.exists(store.remote):
        for entry in fs.ls(store.remote, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("tmp-") or (name.startswith("step") and name > latest):
                fs.rm(entry, recursive=True)  # a save that never reached its commit
    fs.pipe(run_file, json.dumps(identity, indent=2, sort_keys=True).encode())


def prepare_dir(store: CheckpointStore | Path, identity: dict[str, Any], ctx: DistContext) -> None:
    """Make the store usable: wipe it if it belongs to another run, drop half-written saves; a
    remote store is then copied (its committed part) into every node's staging dir."""
    if isinstance(store, Path):
        store = CheckpointStore(store)
    if store.remote:
        what = f"could not read the checkpoint store {store.remote} to resume from it"
        then = "check the S3 endpoint, then run the stage again (its committed checkpoints are unchanged)"
        if ctx.is_main:
            with _store_failure(what, then):
                _prepare_remote(store, identity)
        ctx.barrier()
        if ctx.local_rank == 0:
            shutil.rmtree(store.local, ignore_errors=True)
            with _store_failure(what, then):
                store.pull()
        ctx.barrier()
        return
    ckpt_dir = store.local
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


DISK_FULL_BYTES = 16 << 20  # free space under which a failed checkpoint write is taken as a full disk


@contextlib.contextmanager
def _disk_full_is_enospc(folder: Path, partial: Path) -> Iterator[None]:
    """A checkpoint write that fails on a full disk raises ``OSError(ENOSPC)`` naming the folder.

    torch's zip writer reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos`` (or ``file write failed``), which says nothing of
    space; the unfinished checkpoint folder is removed (it is never ``latest``).
    """
    try:
        yield
    except (RuntimeError, OSError) as err:
        free = shutil.disk_usage(folder).free  # before the partial files go
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.errno != errno.ENOSPC:
            raise
        if isinstance(err, OSError) or free < DISK_FULL_BYTES:
            raise OSError(errno.ENOSPC, f"no space left for the checkpoint ({free} bytes free)", str(folder)) from err
        raise


def save(engine, store: CheckpointStore | Path, step: int, client_state: dict[str, Any], ctx: DistContext,
         keep: int = 2) -> None:
    """Atomic checkpoint of ``engine`` at ``step`` (call on every rank)."""
    if isinstance(store, Path):
        store = CheckpointStore(store)
    if store.remote:
        _save_remote(engine, store, step, client_state, ctx, keep)
        return
    ckpt_dir = store.local
    tmp, final = f"tmp-step{step:08d}", f"step{step:08d}"
    with _disk_full_is_enospc(ckpt_dir, ckpt_dir / tmp):
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


def _save_remote(engine, store: CheckpointStore, step: int, client_state: dict[str, Any], ctx: DistContext,
                 keep: int) -> None:
    """Save into the node's staging dir, upload each node's files, then commit ``latest``."""
    final = f"step{step:08d}"
    with _disk_full_is_enospc(store.local, store.local / final):
        engine.save_checkpoint(str(store.local), tag=final, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)  # ends with a barrier: all shards written
    rerun = "run the stage again: it resumes from the checkpoint that latest names, or starts over without one"
    if ctx.local_rank == 0:
        with _store_failure(f"checkpoint {final} could not be uploaded to {store.remote}",
                            f"it is not committed ({LATEST} was not moved to it); {rerun}"):
            store.push(final)
    ctx.barrier()  # every node's files are on S3; a node whose upload failed never gets here
    if ctx.is_main:
        fs = store._fs()
        with _store_failure(f"checkpoint {final} is uploaded, but {store.remote}/{LATEST} could not be "
                            "moved to it", rerun):
            fs.pipe(f"{store.remote}/{LATEST}", final.encode())  # the commit: one PUT
        try:
            steps = sorted(e for e in fs.ls(store.remote, detail=False) if e.rstrip("/").rsplit("/", 1)[-1] < final
                           and e.rstrip("/").rsplit("/", 1)[-1].startswith("step"))
            for old in steps[: max(0, len(steps) - (keep - 1))]:
                fs.rm(old, recursive=True)
        except Exception as err:
            if not _is_store_failure(err):
                raise
            log.warning("checkpoint %s is committed, but older ones in %s were not removed (%s: %s); the next "
                        "save tries again", final, store.remote, type(err).__name__, err)
        log.info("checkpoint %s/%s saved", store.remote, final)
    ctx.barrier()  # committed; if the commit failed, no rank gets here
    if ctx.local_rank == 0:  # the staging copy follows the store: the newest checkpoint only
        for old in sorted(store.local.glob("step*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(store.local / LATEST, final)


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
