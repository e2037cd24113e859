"""Data preparation: sources, per-sample validation, great-expectations gate, shard I/O.

Modules:
    records: the raw / kept / rejected sample records and the quarantine reason codes.
    sources: webdataset shards, CSV/JSONL manifests, and the dispatch to the demo generators
        (:mod:`synthetic` scenes, :mod:`emoji_source` scenes).
    validate: decode and normalise images, clean captions, per-sample checks.
    groups: the units of pass 1 (an input shard, a manifest range, a generated source), their
        intermediate tar + marker files, and pass 2's shard writer job.
    pool: the worker processes (``prepare_data.workers``) and the order results come back in.
    parts: a fan-out across pods: group tasks' ``part.json`` and the merge's checks.
    collect: merging the groups' outcomes in order, deduplication, split assignment, pass 2.
    dvc_source: the ``dvc`` source kind and prepared data read from a git + DVC repository.
    benchmarks: the paper's evaluation sets in their public layouts.
    sidecars: embed_captions' key-aligned embedding shards and their checks.
    quality: the great-expectations suite and the stage gate.
    report: counts, preview contact sheet, manifest.
    shards: the deterministic shard writer and the readers later stages use
        (:func:`shards.load_manifest`, :func:`shards.iter_samples`, :func:`shards.verify_shards`).
"""
