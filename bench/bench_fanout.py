"""prepare_data fanned out (group tasks + merge) against one process, on the same input.

The input is bench_prepare_data's ``synth20k`` (``--samples`` synthetic scenes written as
img2dataset-style webdataset shards, one group per input shard). Each variant runs the real CLI
(``python -m llm2clip prepare_data``, tracking off) in fresh processes, variants alternating over
``--rounds``:

- ``one process``: ``workers: 1`` (the peer);
- ``one pod, 2 workers``: ``workers: 2``;
- ``fan-out 2 x 1``: two group tasks started at once (``--part 0/2``, ``--part 1/2``, one worker
  each: two "pods" of one core on this box), then the merge (``--parts``), wall time = both.

Every variant's shards must have the same sha256s (checked). Reported: wall seconds, the parts'
and the merge's share for the fan-out, and ratios to the peer.

    .venv/bin/python bench/bench_fanout.py            # ~3 min on the 2-core box
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cli(section: dict, common: dict, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llm2clip", "--log-level", "WARNING", "prepare_data", "--common-json",
           json.dumps(common), "--config-json", json.dumps(section), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"prepare_data failed: {p.args}")


def shard_sums(folder: Path) -> dict[str, str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for split in manifest["shards"].values() for s in split}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    from bench.bench_prepare_data import make_synthetic_shards

    work = Path(tempfile.mkdtemp(prefix="llm2clip-bench-fanout-"))
    try:
        urls = make_synthetic_shards(work / "input", args.samples, args.size)
        common = {"tracking": False, "caption_fields": ["short", "dense"]}
        base = {"sources": [{"kind": "webdataset", "name": "synth", "urls": urls,
                             "caption_fields": {"short": "txt", "dense": "json:dense"}}],
                "val_fraction": 0.05, "shard_size": 1000, "image_max_side": args.size}
        times: dict[str, list[float]] = {}
        split: list[tuple[float, float]] = []
        sums = []
        variants = ["one process", "one pod, 2 workers", "fan-out 2 x 1"]
        for r in range(args.rounds):
            for name in variants if r % 2 == 0 else variants[::-1]:
                out = work / f"out-{len(sums)}"
                start = time.monotonic()
                if name == "fan-out 2 x 1":
                    parts = [str(work / f"part-{len(sums)}-{g}") for g in range(2)]
                    wait(*(cli({**base, "workers": 1}, common, "--part", f"{g}/2", "--data", parts[g])
                           for g in range(2)))
                    middle = time.monotonic()
                    wait(cli({**base, "workers": 1}, common, "--parts", *parts, "--data", str(out)))
                    split.append((middle - start, time.monotonic() - middle))
                else:
                    wait(cli({**base, "workers": 1 if name == "one process" else 2}, common, "--data", str(out)))
                times.setdefault(name, []).append(time.monotonic() - start)
                sums.append(shard_sums(out))
                shutil.rmtree(out)
        if any(s != sums[0] for s in sums):
            raise SystemExit("the variants wrote different shards")
        peer = min(times["one process"])
        print(f"prepare_data on {args.samples} samples ({args.size} px, {len(sums[0])} output shards), "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; shards identical in every run")
        for name in variants:
            best = min(times[name])
            print(f"  {name:22s} best {best:6.1f} s (runs {', '.join(f'{t:.1f}' for t in times[name])}), "
                  f"one process / this = {peer / best:.2f}")
        parts, merge = min(split, key=sum)
        print(f"  fan-out: group tasks {parts:.1f} s + merge {merge:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
