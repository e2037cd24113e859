"""The first losses of tiny seeded runs, pinned (torchtune's recipe tests).

caption_contrastive (+ 5 MNTP pre-steps) and train_vision run 5 steps each on tiny models, on one
process and on two gloo ranks, with ZeRO 0 and 2, through the stages' public entry points
(``pinned_runner.py``). Their loss curves are compared with numbers recorded before the trainers
were refactored onto one training core: a refactor that changes data order, seeding, the LR
schedule, the optimizer, the loss or the DeepSpeed set-up moves them by far more than the
tolerance; re-recording them is a decision to change behaviour, stated in the commit.

``OMP_NUM_THREADS=1`` makes the CPU runs deterministic; the relative tolerance (1e-4) leaves room
for another CPU's kernels (AVX2 vs AVX-512 summation order), nothing more.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.config import CommonConfig, PrepareDataConfig, SyntheticSource, ValidationConfig
from llm2clip.stages import prepare_data
from llm2clip.train.distributed import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_assets = _load("tiny_assets", REPO / "tests/unit/text/tiny_assets.py")
tv_helpers = _load("train_vision_helpers", REPO / "tests/stages/test_train_vision.py")

# Recorded 2026-11-30 on the code before the training-core refactor (issue #12), this 2-core box.
PINNED = {
    "1 rank": {
        "caption_contrastive-zero0": [6.312153, 1.505839, 0.652206, 0.420097, 0.482324],
        "caption_contrastive-zero0-mntp": [4.105220, 4.040941, 4.132513, 4.040443, 4.091891],
        "caption_contrastive-zero2": [6.312152, 1.505840, 0.652207, 0.420098, 0.482325],
        "caption_contrastive-zero2-mntp": [4.105220, 4.040941, 4.132513, 4.040443, 4.091891],
        "train_vision-zero0": [12.479380, 10.859016, 22.655708, 13.933559, 10.641202],
        "train_vision-zero2": [12.479380, 10.859016, 22.655708, 13.933559, 10.641202],
    },
    "2 ranks": {
        "caption_contrastive-zero0": [5.195166, 3.370984, 1.613428, 1.395035, 1.031931],
        "caption_contrastive-zero0-mntp": [4.075750, 4.055953, 4.096395, 4.039524, 4.056248],
        "caption_contrastive-zero2": [5.195166, 3.370983, 1.613429, 1.395035, 1.031932],
        "caption_contrastive-zero2-mntp": [4.075750, 4.055953, 4.096395, 4.039524, 4.056248],
        "train_vision-zero0": [18.261030, 20.124426, 16.656179, 16.758080, 15.480330],
        "train_vision-zero2": [18.261030, 20.124426, 16.656181, 16.758078, 15.480328],
    },
}
RTOL = 1e-4


def env() -> dict:
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": extensions}


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, dict[str, list[float]]]:
    """``{"1 rank" | "2 ranks": {"<stage>-zero<N>[-mntp]": first losses}}``."""
    root = tmp_path_factory.mktemp("pinned")
    tiny_assets.make_llama(root / "model")
    tiny_assets.write_shards(root / "text_data")
    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=48, image_size=64),),
                            val_fraction=0.25, shard_size=12, image_max_side=48,
                            validation=ValidationConfig(min_valid_fraction=0.5))
    prepare_data.run(cfg, CommonConfig(tracking=False), data=str(root / "data"))
    (root / "emb").mkdir()
    tv_helpers.write_embeddings(root / "data", root / "emb")
    runner = str(HERE / "pinned_runner.py")
    commands = {
        "1 rank": [sys.executable, runner],
        "2 ranks": [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), runner],
    }
    out: dict[str, dict[str, list[float]]] = {}
    for name, command in commands.items():
        done = subprocess.run([*command, str(root), str(root / name.replace(" ", "_"))], env=env(), cwd=root,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-5000:]
        runs = {}
        for manifest in sorted((root / name.replace(" ", "_")).glob("*/manifest.json")):
            training = json.loads(manifest.read_text())["training"]
            runs[manifest.parent.name] = training["losses"][:5]
            if training.get("mntp_losses"):
                runs[f"{manifest.parent.name}-mntp"] = training["mntp_losses"][:5]
        out[name] = runs
    print(json.dumps(out, indent=1))  # what to paste into PINNED when behaviour changes on purpose
    return out


@pytest.mark.parametrize("ranks", ["1 rank", "2 ranks"])
def test_first_losses_are_pinned(curves, ranks):
    got = curves[ranks]
    assert sorted(got) == sorted(PINNED[ranks]), sorted(got)
    for run, losses in PINNED[ranks].items():
        assert len(got[run]) == 5, run
        assert got[run] == pytest.approx(losses, rel=RTOL), run


@pytest.mark.parametrize("ranks", ["1 rank", "2 ranks"])
def test_zero_0_and_2_train_alike(curves, ranks):
    """ZeRO-2 partitions the optimizer state and gradients; the maths is the same as stage 0."""
    got = curves[ranks]
    for stage in ("caption_contrastive", "train_vision"):
        assert got[f"{stage}-zero2"] == pytest.approx(got[f"{stage}-zero0"], rel=1e-5), stage
    assert got["caption_contrastive-zero2-mntp"] == pytest.approx(got["caption_contrastive-zero0-mntp"], rel=1e-5)
