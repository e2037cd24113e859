"""Data preparation: sources, per-sample validation, great-expectations gate, shard I/O.

Modules:
    records: the raw / kept / rejected sample records and the quarantine reason codes.
    sources: webdataset shards, CSV/JSONL manifests, and the dispatch to the demo generators
        (:mod:`synthetic` scenes, :mod:`emoji_source` scenes).
    validate: decode and normalise images, clean captions, per-sample checks.
    collect: the validation pass, deduplication, split assignment, shard writing.
    quality: the great-expectations suite and the stage gate.
    report: counts, preview contact sheet, manifest.
    shards: the deterministic shard writer and the readers later stages use
        (:func:`shards.load_manifest`, :func:`shards.iter_samples`, :func:`shards.verify_shards`).
"""
