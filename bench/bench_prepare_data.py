"""prepare_data with 1 and 2 worker processes: wall time, peak RSS, per-sample cost, a projection.

Inputs:

- ``demo``: params.yaml's prepare_data sources (400 synthetic scenes at 128 px + 400 emoji at 96 px;
  two sources, so two groups: a seeded generator is one group, see ``llm2clip.data.groups``);
- ``synth20k``: ``--samples`` (20 000) synthetic scenes of ``--size`` (64) px, rendered once by the
  project's own generator and written as img2dataset-style webdataset shards (JPEG q95 + txt +
  json, 1000 per shard): the layout CC3M/CC12M arrive in, one group per input shard.

Each run is ``prepare_data.run`` in a fresh child process (tracking off unless ``--tracking``),
worker counts alternating (1 2 2 1 for ``--rounds 2``) so that a change of machine load hits both.
Per run: wall time, the parent's phases (pass 1, gate = great-expectations table + suite, pass 2),
peak RSS of the parent (``getrusage(RUSAGE_SELF)``), of the largest child process
(``RUSAGE_CHILDREN``: a worker, or MLflow's ``git``) and of the parent and its children together
(psutil, sampled every 50 ms). ``--baseline DIR`` (a ``git archive`` of an older tree) runs that
tree's single-process prepare_data on the same inputs as a named peer.

Then, in this process on one core: the per-sample cost of decode + validate + re-encode
(``validate_sample``; reading or generating the source is not in it) for the demo sources, the
20k input and a paper-like sample (a 512x384 JPEG q95, as img2dataset's ``--image_size 384
--resize_mode keep_ratio`` leaves it, re-encoded at ``image_max_side`` 384, q95); the parent's
bytes per kept sample (its ``KeptTable``, tracemalloc) and the great-expectations table's
(``DataFrame.memory_usage(deep=True)``); and a projection (labelled so) for CC3M, CC12M and 60M.

    .venv/bin/python bench/bench_prepare_data.py                 # ~5 min on the 2-core box
    .venv/bin/python bench/bench_prepare_data.py --baseline /tmp/head  # + the old code as a peer
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = (("CC3M", 3.3e6), ("CC12M", 12.4e6), ("60M (paper's largest)", 60e6))
PODS = ((16, 1), (32, 1), (32, 8), (64, 16))  # (cores per pod, pods) in the projection


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20_000, help="samples of the synthetic webdataset input")
    p.add_argument("--size", type=int, default=64, help="its image side in pixels")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--rounds", type=int, default=2, help="runs per worker count and input, alternating")
    p.add_argument("--inputs", default="demo,synth20k", help="which inputs to run")
    p.add_argument("--baseline", default="", help="an older source tree to run as a single-process peer")
    p.add_argument("--tracking", action="store_true",
                   help="the demo input with MLflow tracking on (a sqlite store in the work folder), as make run")
    p.add_argument("--dir", default="", help="work folder (default: a temp folder, removed at the end)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ one run (child)


def _rss_sampler(peak: list[int], stop: threading.Event) -> None:
    """Sum of RSS over this process and its children, sampled; the maximum goes into ``peak``."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        stop.wait(0.05)


def child(spec: dict) -> dict:
    """Run prepare_data once (in this fresh process) and measure it."""
    if spec["code"]:
        sys.path.insert(0, spec["code"])
    else:
        sys.path.insert(0, str(REPO))
    os.chdir(spec["cwd"])
    from dataclasses import fields, replace

    from llm2clip.config import CommonConfig, PrepareDataConfig, load_params
    from llm2clip.data import collect, quality
    from llm2clip.stages import prepare_data

    phases: dict[str, float] = {}

    def timed(module, name: str, phase: str) -> None:
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        setattr(module, name, wrapper)

    timed(collect, "collect", "pass 1")
    timed(collect, "write_shards", "pass 2")
    timed(quality, "sample_table", "gate")
    timed(quality, "run_expectations", "gate")
    params = load_params(Path(spec["code"] or REPO) / "params.yaml")  # the tree's own demo settings
    common = replace(params.common, tracking=False)
    if spec["input"] == "demo":
        cfg = params.prepare_data
        if spec.get("tracking"):
            common = replace(params.common, tracking_uri=f"sqlite:///{spec['cwd']}/mlflow.db")
    else:
        from llm2clip.config import WebDatasetSource

        src = WebDatasetSource(name="web", urls=spec["urls"], caption_fields={"short": "txt", "dense": "json:dense"})
        cfg = PrepareDataConfig(sources=(src,), val_fraction=0.1, shard_size=1000, image_max_side=64)
        common = CommonConfig(tracking=False)
    if "workers" in {f.name for f in fields(cfg)}:
        cfg = replace(cfg, workers=spec["workers"])
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(peak, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = prepare_data.run(cfg, common, data=spec["out"])
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    kib = 1024
    return {
        "wall_s": wall, "phases_s": phases, "seen": result.seen, "kept": result.train + result.val,
        "rss_parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "rss_worker_max_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
        "rss_tree_peak_mib": peak[0] / 2**20, "load": os.getloadavg(),
    }


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": spec["code"] or str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=spec["cwd"])
    if proc.returncode:
        raise RuntimeError(f"run {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ inputs


def make_synthetic_shards(folder: Path, samples: int, size: int, per_shard: int = 1000) -> str:
    """``samples`` rendered scenes as webdataset shards; returns the brace pattern."""
    import tarfile

    from llm2clip.config import SyntheticSource
    from llm2clip.data.synthetic import iter_synthetic

    folder.mkdir(parents=True, exist_ok=True)
    src = SyntheticSource(name="bench", count=samples, image_size=size)
    stream = iter_synthetic(src, 1, ("short", "dense"))
    shards = (samples + per_shard - 1) // per_shard
    for shard in range(shards):
        with tarfile.open(folder / f"in-{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                raw = next(stream)
                buf = io.BytesIO()
                raw.image.save(buf, "JPEG", quality=95)
                members = {"jpg": buf.getvalue(), "txt": raw.captions["short"].encode(),
                           "json": json.dumps({"dense": raw.captions["dense"]}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"in-{{000000..{shards - 1:06d}}}.tar")


# ------------------------------------------------------------------------------ in-process costs


def per_sample_ms(raws: list, max_side: int, quality: int, caption_fields: tuple[str, ...]) -> float:
    """Single-core ms per sample of validate_sample (decode + validate + re-encode)."""
    from collections import Counter

    from llm2clip.config import ValidationConfig
    from llm2clip.data.validate import validate_sample

    cfg, stats = ValidationConfig(), Counter()
    start = time.process_time()
    for raw in raws:
        validate_sample(raw, caption_fields, cfg, max_side=max_side, jpeg_quality=quality, stats=stats)
    return (time.process_time() - start) / len(raws) * 1e3


def worker_ms(raws: list, src, caption_fields: tuple[str, ...]) -> float:
    """Single-core ms per sample of a pass-1 worker: validate_sample plus writing the sample to the
    group tar and making its marker entry (``groups._outcome``)."""
    from llm2clip.config import CommonConfig, PrepareDataConfig
    from llm2clip.data import groups
    from llm2clip.data.shards import ShardWriter

    cfg = PrepareDataConfig(sources=(src,), image_max_side=64)
    with tempfile.TemporaryDirectory() as folder:
        job = groups.GroupJob(groups.Group(0, 0), src, cfg, CommonConfig(caption_fields=caption_fields, tracking=False),
                              groups.Store(folder))
        start = time.process_time()
        with ShardWriter(Path(folder) / "group.tar") as writer:
            for raw in raws:
                groups._outcome(raw, job, writer)
        return (time.process_time() - start) / len(raws) * 1e3


def costs(urls: str) -> dict[str, float]:
    """Per-sample costs of the demo sources, the 20k input and a paper-like sample."""
    from dataclasses import replace

    from llm2clip.config import WebDatasetSource, load_params
    from llm2clip.data.records import RawSample
    from llm2clip.data.sources import iter_webdataset, open_source

    params = load_params(REPO / "params.yaml")
    fields, out = params.common.caption_fields, {}
    pd = params.prepare_data
    for src in pd.sources:
        start = time.process_time()
        raws = list(open_source(replace(src, count=200), replace(params.common, tracking=False)).samples)
        out[f"demo {src.name}: generating one ({src.image_size} px)"] = (time.process_time() - start) / len(raws) * 1e3
        out[f"demo {src.name}: validating it"] = per_sample_ms(raws, pd.image_max_side, pd.jpeg_quality, fields)
    if urls:
        wds = WebDatasetSource(name="web", urls=urls, caption_fields={"short": "txt", "dense": "json:dense"})
        raws = [r for _, r in zip(range(1000), iter_webdataset(wds), strict=False)]
        out["synth20k (64 px JPEG)"] = per_sample_ms(raws, 64, 90, fields)
        out["synth20k, + its group tar and marker entry"] = worker_ms(raws, wds, fields)
    from llm2clip.config import SyntheticSource
    from llm2clip.data.synthetic import iter_synthetic

    paper = []
    for raw in iter_synthetic(SyntheticSource(name="p", count=100, image_size=512), 3, fields):
        buf = io.BytesIO()
        raw.image.crop((0, 64, 512, 448)).save(buf, "JPEG", quality=95)  # 512x384, as img2dataset leaves it
        paper.append(RawSample(raw.source, raw.source_id, raw.key, buf.getvalue(), raw.captions, raw.label))
    out["paper-like (512x384 JPEG q95 -> 384 px q95)"] = per_sample_ms(paper, 384, 95, fields)
    return out


def table_bytes_per_row(n: int = 100_000) -> float:
    """tracemalloc bytes per row of the parent's KeptTable plus its pass-1 key dict (keys like a
    webdataset source's: ``web-000012345``)."""
    import tracemalloc

    from llm2clip.data.collect import KeptTable

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table, owner = KeptTable(["web"]), {}
    for i in range(n):
        sample = {"record": {"pixel_hash": os.urandom(16).hex(), "caption_hash": os.urandom(16).hex()},
                  "jpg": [i * 9000 + 1536, 7000 + i % 999], "json": [i * 9000 + 8704, 250 + i % 99]}
        key = f"web-{i:09d}"
        owner[key] = table.append(key, 0, i // 10_000, i % 10_000, sample)
    with_dict = (tracemalloc.get_traced_memory()[0] - before) / n
    del owner
    after = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    return after, with_dict


def gx_table_bytes_per_row(out: Path) -> float:
    """Bytes per row of the great-expectations DataFrame, measured on a prepared output."""
    from llm2clip.data.quality import sample_table
    from llm2clip.data.records import SampleRecord
    from llm2clip.data.shards import iter_samples, load_manifest

    manifest = load_manifest(str(out))
    records = [SampleRecord(key=s.key, source=s.meta["source"], source_id=s.meta["source_id"], label=s.label,
                            captions=s.captions, width=s.meta["width"], height=s.meta["height"],
                            orig_width=s.meta["width"], orig_height=s.meta["height"], pixel_hash="", caption_hash="",
                            split=split)
               for split in ("train", "val") for s in iter_samples(str(out), split, manifest=manifest, decode=False)]
    table = sample_table(records, tuple(manifest["caption_fields"]))
    return float(table.memory_usage(deep=True).sum()) / len(table)


# ------------------------------------------------------------------------------ report


def projection(ms_per_sample: float, parent_us: float, parent_bytes: float) -> list[str]:
    """A projection (not a measurement): pass-1 core-hours, wall time and the parent's memory."""
    lines = [f"PROJECTION from measured per-item costs: pass 1 at {ms_per_sample:.2f} ms/sample per core (the "
             "paper-like sample), split over all cores of all pods with no loss (groups are independent; the "
             f"2-worker ratio above is what this shared box gave), plus the parent's serial {parent_us:.0f} "
             "us/sample (dedupe, split, gate, shard order: measured as the growth of the time outside pass 1 "
             f"and pass 2 from demo to synth20k), and {parent_bytes:.0f} B/sample of parent memory (KeptTable + "
             "great-expectations table, short captions). Reading the input over the network is not in it; "
             "pass 2 (copying bytes) is not either.", "",
             "| data set | samples | pass-1 core-hours | " + " | ".join(f"{c} cores x {p} pod{'s' * (p > 1)}"
                                                                      for c, p in PODS) + " | parent memory |",
             "|---|---|---|" + "---|" * len(PODS) + "---|"]
    for name, n in DATASETS:
        core_h = n * ms_per_sample / 1e3 / 3600
        walls = [f"{(n * ms_per_sample / 1e3 / (cores * pods) + n * parent_us / 1e6) / 3600:.1f} h"
                 for cores, pods in PODS]
        lines.append(f"| {name} | {n / 1e6:.1f}M | {core_h:.0f} | " + " | ".join(walls)
                     + f" | {n * parent_bytes / 1e9:.1f} GB |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(REPO))
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()}", flush=True)
    inputs = args.inputs.split(",")
    urls = ""
    if "synth20k" in inputs:
        start = time.perf_counter()
        urls = make_synthetic_shards(work / "synth-input", args.samples, args.size)
        print(f"synth20k input: {args.samples} scenes of {args.size} px in {time.perf_counter() - start:.1f} s",
              flush=True)
    workers = [int(w) for w in args.workers.split(",")]
    order = [w for r in range(args.rounds) for w in (workers if r % 2 == 0 else workers[::-1])]
    runs: dict[tuple[str, str], list[dict]] = {}
    for name in inputs:
        peers = [("workers", w, "") for w in order] + ([("baseline", 1, args.baseline)] if args.baseline else [])
        for label, w, code in peers:
            out = work / f"out-{name}-{label}{w}"
            shutil.rmtree(out, ignore_errors=True)
            spec = {"input": name, "workers": w, "code": code, "urls": urls, "out": str(out), "cwd": str(work),
                    "tracking": args.tracking}
            result = run_child(spec)
            key = (name, f"{label} {w}" if label == "workers" else "baseline (single process)")
            runs.setdefault(key, []).append(result)
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in result["phases_s"].items())
            print(f"{name:9s} {key[1]:26s} wall {result['wall_s']:6.1f} s ({phases}); peak RSS parent "
                  f"{result['rss_parent_mib']:.0f} MiB, largest child {result['rss_worker_max_mib']:.0f} MiB, "
                  f"all together {result['rss_tree_peak_mib']:.0f} MiB; kept {result['kept']} of {result['seen']}; "
                  f"load {result['load'][0]:.2f}", flush=True)
    print("\nmedian wall time per input and peer:")
    medians = {}
    for (name, peer), results in runs.items():
        walls = sorted(r["wall_s"] for r in results)
        medians[(name, peer)] = walls[len(walls) // 2]
        print(f"  {name:9s} {peer:26s} {medians[(name, peer)]:6.1f} s over {len(walls)} run(s)")
    for name in inputs:
        if (name, "workers 1") in medians and (name, "workers 2") in medians:
            ratio = medians[(name, "workers 1")] / medians[(name, "workers 2")]
            print(f"  {name}: workers 1 / workers 2 wall time = {ratio:.2f}")
    cost = costs(urls)
    print("\nper-sample CPU time, one core (validating = decode + validate + re-encode, validate_sample):")
    for what, ms in cost.items():
        print(f"  {what:46s} {ms:6.2f} ms")
    rows, rows_pass1 = table_bytes_per_row()
    print(f"\nparent memory per kept sample: KeptTable {rows:.0f} B (+ the pass-1 key dict: {rows_pass1:.0f} B)")
    synth_out = work / "out-synth20k-workers2"
    if synth_out.exists() and ("demo", "workers 2") in runs:
        gx = gx_table_bytes_per_row(synth_out)
        print(f"great-expectations table (held during the gate): {gx:.0f} B per kept sample of synth20k (short "
              "captions; grows with caption length)")
        serial = {}
        for name in ("demo", "synth20k"):
            best = min(runs[(name, "workers 2")], key=lambda r: r["wall_s"])
            outside = best["wall_s"] - best["phases_s"].get("pass 1", 0) - best["phases_s"].get("pass 2", 0)
            serial[name] = (outside, best["seen"])
        (t20k, n20k), (tdemo, ndemo) = serial["synth20k"], serial["demo"]
        parent_us = max(0.0, (t20k - tdemo) / (n20k - ndemo)) * 1e6
        print()
        print("\n".join(projection(cost["paper-like (512x384 JPEG q95 -> 384 px q95)"], parent_us, rows + gx)))
    print(f"\nload average at the end {os.getloadavg()}")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
