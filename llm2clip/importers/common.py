"""What every importer shares: the source and output dirs, reading weights, the strict key map,
and the provenance (``imported_from``) every imported artifact records in its manifest.

A user's mistake (a missing directory, a non-empty output, a layout that is not the released one)
is a :class:`~llm2clip.io.StageError`: the CLI prints it as one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2clip.contracts import MANIFEST, has_manifest
from llm2clip.io import StageError, is_remote, sha256_file

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# How many keys one error line lists per kind of problem (the rest are counted).
LISTED = 8


def source_dir(src: str, kind: str) -> Path:
    """``src`` as an existing local directory.

    Raises:
        StageError: a URL, or no such directory.
    """
    if is_remote(src):
        raise StageError(f"import {kind}: SRC {src} must be a local directory (a snapshot of the released repo)")
    path = Path(src).expanduser()
    if not path.is_dir():
        raise StageError(f"import {kind}: SRC {src} is not a directory; download the released repo snapshot "
                         "first (e.g. `huggingface-cli download <repo> --local-dir DIR`)")
    return path.resolve()


def output_dir(dst: str, src: Path, kind: str, overwrite: bool) -> Path:
    """``dst`` as a local directory to write, empty (a previous import is replaced with ``overwrite``).

    Only an empty directory or one that a previous import wrote (its manifest records
    ``imported_from``) is ever cleared: ``overwrite`` never deletes anything else.

    Raises:
        StageError: a URL, ``dst`` inside ``src`` (or the reverse), or a non-empty ``dst``.
    """
    if is_remote(dst):
        raise StageError(f"import {kind}: DST {dst} must be a local directory")
    path = Path(dst).expanduser().resolve()
    if path == src or src in path.parents or path in src.parents:
        raise StageError(f"import {kind}: DST {path} and SRC {src} must not contain each other")
    if path.exists() and not path.is_dir():
        raise StageError(f"import {kind}: DST {path} is a file")
    if path.is_dir() and any(path.iterdir()):
        previous = _previous_import(path)
        if not overwrite or previous is None:
            why = ("pass --overwrite to replace the previous import" if previous is not None else
                   "it is not a previous import, so it is never cleared: choose an empty or new directory")
            raise StageError(f"import {kind}: DST {path} is not empty; {why}")
        log.info("replacing the previous %s import in %s", previous, path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def written_or_emptied(out: Path) -> Iterator[None]:
    """Write ``out`` (an empty dir from :func:`output_dir`) in the block; if it fails, empty it again,
    so a rerun does not find a half-written dir it refuses to clear."""
    try:
        yield
    except BaseException:
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        raise


def _previous_import(path: Path) -> str | None:
    """The kind a previous import recorded in ``path``'s manifest, else None."""
    if not has_manifest(path):
        return None
    try:
        record = json.loads((path / MANIFEST).read_text()).get("imported_from")
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) else None


def read_json(path: Path, kind: str, required: bool = True) -> dict[str, Any]:
    """A JSON object file of the source.

    Raises:
        StageError: missing (when required) or not a JSON object.
    """
    if not path.is_file():
        if required:
            raise StageError(f"import {kind}: {path} not found: not a snapshot of the released repo")
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise StageError(f"import {kind}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise StageError(f"import {kind}: {path} is not a JSON object")
    return data


def safetensors_files(src: Path) -> list[Path]:
    """The safetensors weight files of an HF snapshot: the index's shards, else ``*.safetensors``."""
    index = src / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise StageError(f"{index} names shards that are not in {src}: {missing}")
        return [src / s for s in shards]
    return sorted(src.glob("*.safetensors"))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one weights file: safetensors, or a pickle-free state dict (``weights_only``).

    A ``state_dict``/``model``/``module`` entry of a pickle is unwrapped (training checkpoints).

    Raises:
        StageError: a pickle that holds code or something other than a dict of tensors.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:  # memory-mapped where the file allows it (zip format): a 1.7 GB .pt is not read twice
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise StageError(f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): only plain tensor state dicts are "
                         "imported, never pickled code") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageError(f"{path} holds no state dict of tensors")
    if any(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def hash_files(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """``{relative name: sha256}`` of files in ``directory``."""
    return {name: sha256_file(directory / name) for name in sorted(names)}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED])
    return f"[{shown}{f', ... (+{len(keys) - LISTED} more)' if len(keys) > LISTED else ''}]"


@dataclass
class KeyMap:
    """A strict map from a released state dict onto one of ours.

    Attributes:
        rules: ``(source regex, target template)``: the first rule whose regex matches a whole
            source key names its target (``re.Match.expand`` syntax, ``\\1``).
        drops: ``(source regex, reason)``: source keys that are deliberately not used.
        fills: Target key -> ``(make(target_tensor) -> tensor, how)`` for target tensors the
            release does not hold (used only when no source key maps onto them).
    """

    rules: list[tuple[str, str]]
    drops: list[tuple[str, str]] = field(default_factory=list)
    fills: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = field(default_factory=dict)

    def apply(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
        """Map ``source`` onto the keys, shapes and dtypes of ``target``.

        A source tensor whose shape differs from the target's only by size-1 dimensions (a 0-d
        ``logit_scale`` onto our ``[1]``) is reshaped; its values are cast to the target dtype.

        Returns:
            ``(state, dropped, filled)``: the full target state dict, source key -> why dropped,
            target key -> how filled.

        Raises:
            StageError: one line listing the source keys no rule takes, the target keys nothing
                fills, two source keys for one target, and shape mismatches.
        """
        rules = [(re.compile(p), t) for p, t in self.rules]
        drops = [(re.compile(p), r) for p, r in self.drops]
        mapped: dict[str, tuple[str, torch.Tensor]] = {}
        dropped: dict[str, str] = {}
        unused, twice, foreign = [], [], []
        for key in sorted(source):
            reason = next((r for p, r in drops if p.fullmatch(key)), None)
            if reason is not None:
                dropped[key] = reason
                continue
            match = next((m for m in (p.fullmatch(key) for p, _ in rules) if m), None)
            if match is None:
                unused.append(key)
                continue
            name = match.expand(next(t for p, t in rules if p.fullmatch(key)))
            if name not in target:
                foreign.append(key if name == key else f"{key} -> {name}")
            elif name in mapped:
                twice.append(f"{mapped[name][0]} and {key} -> {name}")
            else:
                mapped[name] = (key, source[key])
        filled = {k: how for k, (_, how) in self.fills.items() if k in target and k not in mapped}
        missing = sorted(k for k in target if k not in mapped and k not in filled)
        wrong = [f"{key} {tuple(t.shape)} -> {name} {tuple(target[name].shape)}"
                 for name, (key, t) in sorted(mapped.items())
                 if t.numel() != target[name].numel()
                 or [d for d in t.shape if d != 1] != [d for d in target[name].shape if d != 1]]
        problems = [f"{label} {_listed(keys)}" for label, keys in (
            ("source keys no rule takes", unused), ("target keys nothing fills", missing),
            ("source keys with no tensor of ours", foreign), ("two sources for one target", twice),
            ("wrong shapes", wrong)) if keys]
        if problems:
            raise StageError(f"{what} is not in the released layout: {'; '.join(problems)}")
        state = {name: t.reshape(target[name].shape).to(target[name].dtype) for name, (_, t) in mapped.items()}
        for name in filled:
            state[name] = self.fills[name][0](target[name])
        return state, dropped, filled


def dtypes_of(tensors: Iterable[torch.Tensor]) -> list[str]:
    """The distinct dtypes of ``tensors``, as strings (for the provenance record)."""
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def provenance(kind: str, src: Path, files: dict[str, str], *, release: str | None = None,
               dropped: dict[str, str] | None = None, filled: dict[str, str] | None = None,
               notes: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """The ``imported_from`` record of an imported artifact's manifest.

    Args:
        kind: The importer kind.
        src: The source snapshot directory.
        files: Source file name -> sha256 of every file the import read.
        release: The released repo the snapshot claims to be (its config's ``_name_or_path``), if known.
        dropped: Source key/file -> why it was not used.
        filled: Target key -> how it was filled without a source tensor.
        notes: Assumptions that could not be checked against the source.
        **extra: Further kind-specific fields.
    """
    from llm2clip.importers import importer_kind

    return {"kind": kind, "source": str(src), "releases": list(importer_kind(kind).releases),
            "release": release, "files": files, "dropped": dict(sorted((dropped or {}).items())),
            "filled": dict(sorted((filled or {}).items())), "notes": list(notes),
            "reference": "docs/released-checkpoints.md", **extra}
