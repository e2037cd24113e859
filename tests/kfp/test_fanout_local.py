"""prepare_data fanned out under kfp.local: a ParallelFor of group tasks and a merge, from the
production pipeline code (``_data_stage``) and a cluster profile with ``shard_groups: 2``.

One group task is killed (SIGKILL, as a pod eviction would) after it finished its first group:
kfp.local retries that task alone (the profile's retry policy), the retry reuses the finished
group, and the merged output is the single-process output byte for byte. kfp.local runs in a
subprocess (its ``local.init`` changes logging for the rest of a process).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kfp_helpers import REPO, fanout_profile

from llm2clip.config import CommonConfig, PrepareDataConfig, ValidationConfig, WebDatasetSource, to_dict
from llm2clip.data.shards import ShardWriter
from llm2clip.stages import prepare_data

SHARDS = 4
SIZES = (6, 6, 6, 48)  # the last group (task 1's second) is the big one: the kill lands while it runs
# The pipeline: prepare_data only, built by the production pipeline's own fan-out builder.
RUN = """
import json, sys
from kfp import dsl, local
from llm2clip.cluster.profile import load_cluster_profile
from pipelines.llm2clip_pipeline import _data_stage

profile_path, root, common, section = sys.argv[1:5]
profile = load_cluster_profile(profile_path)


@dsl.pipeline(name="prepare-fanout")
def prepare_only(common: dict, prepare_data: dict, image: str = "python:3.11", gpu_image: str = "python:3.11"):
    _data_stage(profile, "prepare_data", {"common": common, "prepare_data": prepare_data},
                {"cpu": image, "gpu": gpu_image})


local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
prepare_only(common=json.loads(common), prepare_data=json.loads(section))
"""


def write_inputs(folder: Path) -> str:
    """4 webdataset input shards of noise pictures (``SIZES``): 4 groups, 2 per group task."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir()
    for shard in range(SHARDS):
        with ShardWriter(folder / f"in-{shard:06d}.tar") as writer:
            for i in range(SIZES[shard]):
                side = 48 if SIZES[shard] < 10 else 320  # big pictures: seconds of decoding and re-encoding
                pixels = np.random.default_rng(100 * shard + i).integers(0, 255, (side, side, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "PNG")
                writer.write(f"s{shard}-{i}", {"png": buf.getvalue(), "txt": f"noise picture {shard} {i}".encode()})
    return f"{folder}/in-{{000000..{SHARDS - 1:06d}}}.tar"


def killer(root: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL group task 1's process once its first group (group-000001) is complete."""
    pattern = re.compile(r'"part":\s*1\b')
    while not stop.is_set() and not killed:
        done = list(root.rglob("prepare-data-group*/**/.groups/group-000001.json"))
        if done:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "prepare_data_group" in cmd and pattern.search(cmd) and "executor_main" in cmd:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fanned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fanout")
    cfg = PrepareDataConfig(sources=(WebDatasetSource(name="web", urls=write_inputs(tmp / "inputs"),
                                                      caption_fields={"short": "txt"}),),
                            val_fraction=0.25, shard_size=5, image_max_side=32, workers=1,
                            validation=ValidationConfig(min_valid_fraction=0.5, min_captions=1))
    common = CommonConfig(tracking=False, caption_fields=("short",))
    profile = fanout_profile(tmp, {"prepare_data": 2})
    root = tmp / "lo"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=killer, args=(root, stop, killed), daemon=True)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, "-c", RUN, str(profile), str(root), json.dumps(to_dict(common)),
                               json.dumps(to_dict(cfg))], cwd=tmp, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (run_dir,) = root.glob("prepare-fanout-*")
    return run_dir, cfg, common, killed


def test_the_killed_group_task_was_retried_alone_and_resumed(fanned):
    run_dir, _, _, killed = fanned
    assert len(killed) == 1  # the watcher found group task 1 and killed it
    parts = sorted((json.loads(p.read_text()) for p in run_dir.rglob("part.json")), key=lambda r: r["part"])
    assert [(r["part"], r["groups"]) for r in parts] == [(0, ["group-000000", "group-000002"]),
                                                        (1, ["group-000001", "group-000003"])]
    # group task 0 ran once; the retry of task 1 took over what it finished before the kill
    # (group-000001 at least: the kill came once its marker was written)
    assert parts[0]["reused"] == 0 and parts[1]["reused"] >= 1


def test_the_merge_writes_the_single_process_output(fanned, tmp_path):
    run_dir, cfg, common, _ = fanned
    (merged,) = run_dir.glob("prepare-data-merge*/data/manifest.json")
    prepare_data.run(cfg, common, data=str(tmp_path / "single"))
    got, want = (json.loads(p.read_text()) for p in (merged, tmp_path / "single" / "manifest.json"))
    assert got["shards"] == want["shards"] and got["counts"] == want["counts"]
    assert got["counts"]["seen"] == sum(SIZES)
