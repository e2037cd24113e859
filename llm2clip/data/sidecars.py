"""Caption-embedding sidecars: key-aligned ``X_text_embeddings.tar`` next to each image shard.

Layout written by embed_captions (the LLM2CLIP reference layout, with a shape/dtype header)::

    <emb>/train-000000_text_embeddings.tar   one sample per image key, same keys, same order as
                                             <data>/train-000000.tar; members
                                             <key>.<field>.npy = (k, dim) array of the k captions
                                             of that caption field (dtype of the manifest)
    <emb>/train-000000_text_embeddings.json  done-marker: sha256 + what the sidecar was made from
    <emb>/zeroshot/<set>.npy, <set>.json     (C, T, dim) class-prompt embeddings + class names
    <emb>/manifest.json                      written last (see :func:`verify_sidecars`)

A plain ``webdataset.WebDataset`` over a sidecar yields ``{"__key__", "<field>.npy"}`` samples,
so the image tar and its sidecar can be read in lockstep by any webdataset pipeline; the helpers
here do that and check the key of every sample (:func:`iter_shard_pair`, :func:`iter_lockstep`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from llm2clip.contracts import contract, read_manifest, rerun
from llm2clip.data.shards import PreparedSample, ShardWriter, iter_groups, load_manifest
from llm2clip.io import StageError, atomic_write_json, is_remote, s3_filesystem, sha256_file

STAGE = "embed_captions"
FORMAT_VERSION = contract(STAGE).format_version
SUFFIX = "_text_embeddings"
RERUN = rerun(STAGE)


def sidecar_name(shard: str) -> str:
    """``train-000000.tar`` -> ``train-000000_text_embeddings.tar``."""
    return shard[: -len(".tar")] + SUFFIX + ".tar"


def marker_name(shard: str) -> str:
    """``train-000000.tar`` -> ``train-000000_text_embeddings.json`` (the done-marker)."""
    return shard[: -len(".tar")] + SUFFIX + ".json"


# ------------------------------------------------------------------------------- tar plumbing


@contextmanager
def open_stream(url: str, endpoint_url: str = "") -> Iterator[IO[bytes]]:
    """A binary read stream of a local path or ``s3://`` URL."""
    if is_remote(url):
        with s3_filesystem(endpoint_url).open(url, "rb") as f:
            yield f
    else:
        with open(url, "rb") as f:
            yield f


class HashingReader:
    """A read-only stream wrapper that hashes what passes through (verify while streaming)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        """Read to the end (tar padding) and return the hex digest of the whole stream."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes (header carries shape and dtype; never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_shard_records(url: str, expected_sha256: str | None = None, endpoint_url: str = "",
                       ) -> list[tuple[str, dict[str, Any]]]:
    """``(key, json meta)`` of every sample of an image shard, in order; images are skipped.

    Raises:
        StageError: the shard's sha256 differs from ``expected_sha256`` (the data manifest).
    """
    with open_stream(url, endpoint_url) as raw:
        reader = HashingReader(raw)
        records = [(k, json.loads(p["json"])) for k, p in iter_groups(reader, {"json"}) if "json" in p]
        digest = reader.drain()
    if expected_sha256 and digest != expected_sha256:
        raise StageError(f"{url}: sha256 differs from the data manifest; the data directory was "
                         "changed after prepare_data: re-run `dvc repro prepare_data` (KFP: the prepare_data task)")
    return records


def write_sidecar(path: Path, keys: list[str], arrays: list[dict[str, np.ndarray]]) -> str:
    """Write one sidecar atomically (temp file + rename); returns its sha256.

    Args:
        path: The ``*_text_embeddings.tar`` to write.
        keys: Sample keys in image-shard order.
        arrays: Per key, ``{field: (k, dim) array}``.
    """
    with ShardWriter(path) as writer:
        for key, fields in zip(keys, arrays, strict=True):
            writer.write(key, {f"{name}.npy": encode_array(a) for name, a in fields.items()})
    return sha256_file(path)


def read_sidecar(url: str, endpoint_url: str = "") -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(key, {field: (k, dim) array})`` of every sample of a sidecar, in order."""
    with open_stream(url, endpoint_url) as f:
        for key, parts in iter_groups(f):
            yield key, {ext.removesuffix(".npy"): decode_array(b) for ext, b in parts.items()}


# ------------------------------------------------------------------------------- done-markers


def marker_matches(out: Path, shard: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The done-marker of a finished sidecar, or None when the sidecar must be (re)made.

    Finished = marker present, made with the same ``identity`` (encoder fingerprint, image-shard
    sha256, dtype, ...) and the sidecar's sha256 equals the one the marker recorded. A sidecar
    without a marker (a crash between rename and marker) is redone.
    """
    marker, sidecar = out / marker_name(shard), out / sidecar_name(shard)
    if not marker.is_file() or not sidecar.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    if any(done.get(k) != v for k, v in identity.items()):
        return None
    return done if sha256_file(sidecar) == done.get("sha256") else None


def write_marker(out: Path, shard: str, marker: dict[str, Any]) -> None:
    atomic_write_json(out / marker_name(shard), marker)


# ------------------------------------------------------------------------------- lockstep


def _mismatch(sidecar: str, image: str, index: int, got: str | None, want: str | None) -> StageError:
    if got is None or want is None:
        what = f"has {'fewer' if got is None else 'more'} samples than {image}"
    else:
        what = f"sample {index} has key {got!r} but {image} has {want!r} there (keys changed or out of order)"
    return StageError(f"{sidecar}: {what}: the sidecar is not aligned with its image shard; {RERUN}")


def iter_shard_pair(image_url: str, sidecar_url: str, *, endpoint_url: str = "", decode: bool = True,
                    ) -> Iterator[tuple[PreparedSample, dict[str, np.ndarray]]]:
    """Read an image shard and its sidecar in lockstep, checking every key.

    Yields:
        ``(sample, {field: (k, dim) array})``; ``sample.image`` is PIL RGB (or jpg bytes with
        ``decode=False``).

    Raises:
        StageError: a key differs or one file ends before the other.
    """
    from PIL import Image

    with open_stream(image_url, endpoint_url) as fi, open_stream(sidecar_url, endpoint_url) as fs:
        images, vectors = iter_groups(fi), iter_groups(fs)
        for index in itertools.count():
            image, vector = next(images, None), next(vectors, None)
            if image is None and vector is None:
                return
            if image is None or vector is None or image[0] != vector[0]:
                raise _mismatch(sidecar_url, image_url, index, vector and vector[0], image and image[0])
            key, parts = image
            picture = Image.open(io.BytesIO(parts["jpg"])).convert("RGB") if decode else parts["jpg"]
            arrays = {ext.removesuffix(".npy"): decode_array(b) for ext, b in vector[1].items()}
            yield PreparedSample(key, picture, json.loads(parts["json"])), arrays


def iter_lockstep(data_dir: str, embeddings_dir: str, split: str, *, endpoint_url: str = "",
                  decode: bool = True) -> Iterator[tuple[PreparedSample, dict[str, np.ndarray]]]:
    """Every sample of a split with its caption embeddings (shard order, keys checked)."""
    data = load_manifest(data_dir, endpoint_url)
    base_d, base_e = str(data_dir).rstrip("/"), str(embeddings_dir).rstrip("/")
    for entry in data["shards"].get(split, []):
        yield from iter_shard_pair(f"{base_d}/{entry['name']}", f"{base_e}/{sidecar_name(entry['name'])}",
                                   endpoint_url=endpoint_url, decode=decode)


# ------------------------------------------------------------------------------- verification


def _keys(url: str, endpoint_url: str) -> list[str]:
    with open_stream(url, endpoint_url) as f:
        return [k for k, _ in iter_groups(f, wanted=set())]


def _sha256(url: str, endpoint_url: str) -> str | None:
    if is_remote(url):
        fs = s3_filesystem(endpoint_url)
        return hashlib.sha256(fs.cat(url)).hexdigest() if fs.exists(url) else None
    return sha256_file(url) if Path(url).is_file() else None


def _check_alignment(data: dict[str, Any], emb: dict[str, Any], data_dir: str) -> list[tuple[dict, dict]]:
    """Pair every image shard of the data manifest with its sidecar entry (manifest level)."""
    missing = [f for f in emb["caption_fields"] if f not in data.get("caption_fields", [])]
    if missing:
        raise StageError(f"embeddings hold caption fields {missing} that {data_dir} lacks; {RERUN}")
    pairs = []
    for split, shards in data["shards"].items():
        made = {e["image_shard"]: e for e in emb["sidecars"].get(split, [])}
        extra = sorted(set(made) - {s["name"] for s in shards})
        if extra:
            raise StageError(f"embeddings have sidecars for {extra}, which {data_dir} no longer has; {RERUN}")
        for shard in shards:
            entry = made.get(shard["name"])
            if entry is None:
                raise StageError(f"no embedding sidecar for image shard {shard['name']}; {RERUN}")
            if entry["image_sha256"] != shard["sha256"] or entry["count"] != shard["count"]:
                raise StageError(
                    f"{entry['name']} was aligned to image shard sha256 {entry['image_sha256']} "
                    f"({entry['count']} samples) but {data_dir}/{shard['name']} is {shard['sha256']} "
                    f"({shard['count']} samples): the data changed after embed_captions; {RERUN}")
            pairs.append((shard, entry))
    return pairs


def verify_sidecars(data_dir: str, embeddings_dir: str, expected_fingerprint: str | None = None, *,
                    endpoint_url: str = "", check_files: bool = True, check_keys: bool = True,
                    ) -> dict[str, Any]:
    """Refuse embeddings that do not belong to ``data_dir`` (and to the expected encoder).

    Args:
        data_dir: The prepare_data output the sidecars must be aligned with.
        embeddings_dir: The embed_captions output.
        expected_fingerprint: The encoder fingerprint the caller needs
            (:func:`llm2clip.text.embed.encoder_fingerprint` of its caption_encoder); None: any.
        endpoint_url: S3 endpoint for ``s3://`` dirs.
        check_files: Recompute every sidecar's sha256 (reads each sidecar once).
        check_keys: Compare every sidecar's keys, in order, with its image shard's keys (reads
            every image shard once; a training loop that reads through :func:`iter_shard_pair`
            checks each key anyway and may pass False).

    Returns:
        The embeddings manifest.

    Raises:
        StageError: saying what differs and what to re-run.
    """
    emb = read_manifest(STAGE, embeddings_dir, endpoint_url)  # its contract: stage, format, fields
    made_with = emb["encoder"]["fingerprint"]
    if expected_fingerprint is not None and made_with != expected_fingerprint:
        raise StageError(f"embeddings were made with encoder {made_with} but caption_encoder is "
                         f"{expected_fingerprint}: {RERUN}")
    data = load_manifest(data_dir, endpoint_url)
    base = str(embeddings_dir).rstrip("/")
    for shard, entry in _check_alignment(data, emb, data_dir):
        url = f"{base}/{entry['name']}"
        if check_keys:
            got = _keys(url, endpoint_url)
            want = _keys(f"{str(data_dir).rstrip('/')}/{shard['name']}", endpoint_url)
            if got != want:
                pairs = zip(got, want, strict=False)
                i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(want)))
                raise _mismatch(url, shard["name"], i, got[i] if i < len(got) else None,
                                want[i] if i < len(want) else None)
        if check_files and _sha256(url, endpoint_url) != entry["sha256"]:
            raise StageError(f"{url}: missing or sha256 differs from the embeddings manifest "
                             f"(changed after embed_captions); {RERUN}")
    return emb


# ------------------------------------------------------------------------------- the output dir


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def clean_output(out: Path, shards: set[str]) -> list[str]:
    """Prepare an output dir for a (re)run; finished sidecars of ``shards`` are kept.

    Removed: ``manifest.json`` first (the dir reads unfinished until the new one is written),
    temp files a killed run left, sidecars/markers of image shards the data no longer has, and
    ``zeroshot/`` (cheap, always remade).

    Returns:
        The names removed.
    """
    wanted = {sidecar_name(s) for s in shards} | {marker_name(s) for s in shards}
    removed = []
    for path in sorted(out.iterdir(), key=lambda p: p.name != "manifest.json") if out.is_dir() else []:
        stale = SUFFIX in path.name and path.name not in wanted and not path.name.startswith(".")
        if path.is_file() and (path.name == "manifest.json" or _is_temp(path.name) or stale):
            path.unlink()
            removed.append(path.name)
    for path in sorted((out / "zeroshot").glob("*")) if (out / "zeroshot").is_dir() else []:
        path.unlink()
        removed.append(f"zeroshot/{path.name}")
    return removed


def zeroshot_classes(data_dir: str, split: str, manifest: dict[str, Any], endpoint_url: str = "",
                     ) -> list[str]:
    """Sorted distinct ``label`` values of a split's samples (empty when it has none)."""
    base, labels = str(data_dir).rstrip("/"), set()
    for entry in manifest["shards"].get(split, []):
        for _, meta in read_shard_records(f"{base}/{entry['name']}", entry["sha256"], endpoint_url):
            if meta.get("label") is not None:
                labels.add(str(meta["label"]))
    return sorted(labels)


def write_zeroshot(out: Path, name: str, classnames: list[str], templates: list[str], vectors: np.ndarray,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``zeroshot/<name>.npy`` (C, T, D) and ``zeroshot/<name>.json``; returns the manifest entry.

    Args:
        vectors: ``(C, T, D)`` prompt embeddings, already in the stored dtype;
            ``vectors[c, t]`` embeds ``templates[t].format(classnames[c])``.
        meta: Extra fields for the json (split, dtype, normalized, encoder fingerprint).
    """
    from llm2clip.io import atomic_path

    npy, info = out / "zeroshot" / f"{name}.npy", out / "zeroshot" / f"{name}.json"
    with atomic_path(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    atomic_write_json(info, {**meta, "classnames": classnames, "templates": templates,
                             "shape": list(vectors.shape)})
    return {"file": f"zeroshot/{npy.name}", "meta": f"zeroshot/{info.name}", "classes": len(classnames),
            "templates": len(templates), "sha256": sha256_file(npy)}


def build_manifest(identity: dict[str, Any], markers: list[dict[str, Any]], zeroshot: dict[str, Any],
                   **provenance: Any) -> dict[str, Any]:
    """The embeddings ``manifest.json`` body (what :func:`verify_sidecars` and later stages read).

    Written by the stage through :func:`llm2clip.contracts.write_manifest`.

    Args:
        identity: fingerprint, dtype, normalized, caption_fields, precision, format_version.
        markers: Done-markers of every sidecar (made now or kept).
        zeroshot: ``{set: entry}`` from :func:`write_zeroshot`.
        provenance: Extra top-level fields (config_hash, encoder, data).
    """
    by_split: dict[str, list[dict[str, Any]]] = {}
    for m in sorted(markers, key=lambda m: m["image_shard"]):
        by_split.setdefault(m["split"], []).append({
            "name": m["name"], "image_shard": m["image_shard"], "image_sha256": m["image_sha256"],
            "count": m["count"], "sha256": m["sha256"], "captions": m["stats"]["captions"],
        })
    dims = {m["dim"] for m in markers}
    return {
        "stage": STAGE, "format_version": FORMAT_VERSION,
        "layout": "X.tar -> X_text_embeddings.tar, same __key__s in the same order; members "
                  "<key>.<field>.npy of shape (k, dim), k = captions of that field",
        "dim": dims.pop() if len(dims) == 1 else None, "dtype": identity["dtype"],
        "normalized": identity["normalized"], "caption_fields": identity["caption_fields"],
        "precision": identity["precision"], **provenance,
        "encoder": {**provenance.get("encoder", {}), "fingerprint": identity["fingerprint"]},
        "sidecars": by_split,
        "counts": {"shards": len(markers), "samples": sum(m["count"] for m in markers),
                   "captions": sum(m["stats"]["captions"] for m in markers)},
        "zeroshot": zeroshot,
    }
