"""Caption-contrastive trainer: deterministic batches, and kill -9 + restart resumes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm2clip.text.contrastive import PairSampler, step_seed

IMAGES = [[("short", f"s{i}"), ("dense", f"d{i}")] for i in range(10)] + [[("short", "lonely")]]


def test_batches_are_deterministic_distinct_and_well_formed():
    sampler = PairSampler(IMAGES, batch_size=2, world_size=2, seed=3)
    assert len(sampler.images) == 10 and sampler.steps_per_epoch == 2  # the 1-caption image is dropped
    again = PairSampler(IMAGES, batch_size=2, world_size=2, seed=3)
    for step in (1, 2, 3, 7):
        per_rank = [sampler.batch(step, r) for r in range(2)]
        assert per_rank == [again.batch(step, r) for r in range(2)]
        images = [q[1:] for qs, *_ in per_rank for q in qs]
        assert len(set(images)) == 4  # no image twice in a global batch
        for queries, positives, negatives, instructions in per_rank:
            assert instructions == [""] * len(queries)
            for q, p, n in zip(queries, positives, negatives, strict=True):
                assert q[1:] == p[1:] and q != p  # two different captions of one image
                assert n[0] == p[0] and n[1:] != p[1:]  # same type as the positive, other image
    assert sampler.batch(1, 0) != sampler.batch(3, 0)  # a new permutation each epoch
    assert step_seed(3, 5, 0) != step_seed(3, 5, 1)


def test_too_few_images_for_the_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="lower batch_size"):
        PairSampler(IMAGES, batch_size=8, world_size=2, seed=0)


DRIVER = """
import json, logging, sys
from llm2clip.config import load_params
from llm2clip.stages.caption_contrastive import run
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
params = load_params(None, sys.argv[3:])
result = run(params.caption_contrastive, params.common, data=sys.argv[1], caption_encoder=sys.argv[2])
print("RESULT", json.dumps(result.summary()), flush=True)
"""


def _losses(db: Path) -> dict[str, dict[int, float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_uuid, step, value from metrics where key = 'train_loss'").fetchall()
    out: dict[str, dict[int, float]] = {}
    for run, step, value in rows:
        out.setdefault(run, {})[step] = value
    return out


def _step(latest: Path) -> int:
    return int(latest.read_text().strip().removeprefix("step"))


def _logged_steps(db: Path) -> int:
    try:
        return max((max(steps) for steps in _losses(db).values()), default=0)
    except sqlite3.OperationalError:  # tables not created yet, or busy
        return 0


def _kill_tree(pid: int) -> None:
    import psutil

    for child in psutil.Process(pid).children(recursive=True):  # torchrun puts ranks in new sessions
        os.kill(child.pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def test_two_rank_run_killed_after_a_checkpoint_resumes_and_finishes(tiny_llama, tiny_shards, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, db = tmp_path / "encoder", tmp_path / "mlflow.db"
    overrides = [
        f"caption_contrastive.model={tiny_llama}", "caption_contrastive.prompt_template='{text}'",
        "caption_contrastive.batch_size=8", "caption_contrastive.max_steps=150",
        "caption_contrastive.warmup_steps=5", "caption_contrastive.lr=0.003",
        "caption_contrastive.checkpoint_every=10", "caption_contrastive.log_every=1",
        f"common.tracking_uri=sqlite:///{db}",
    ]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           str(driver), str(tiny_shards), str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        latest = Path(f"{out}.ckpt") / "latest"
        deadline = time.monotonic() + 420
        # kill a few steps after a checkpoint, so both runs log those steps (compared below)
        while not latest.is_file() or _logged_steps(db) < _step(latest) + 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 420 s"
            time.sleep(0.05)
        _kill_tree(first.pid)
        first.wait()
    killed_at = _step(latest)
    assert not (out / "manifest.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    resumed_from = manifest["training"]["resumed_from"]
    assert resumed_from >= killed_at >= 10
    assert manifest["training"]["steps"] == 150
    assert f"resuming at step {resumed_from + 1} of 150" in second.stderr
    assert not Path(f"{out}.ckpt").exists()  # cleaned up after success

    # The steps both runs logged after the checkpoint: the resumed run repeats them exactly.
    runs = _losses(db)
    assert len(runs) == 2
    resumed, killed = sorted(runs.values(), key=min, reverse=True)  # the resumed run starts later
    assert min(resumed) == resumed_from + 1
    common_steps = [s for s in killed if s > resumed_from and s in resumed]
    assert common_steps
    for step in common_steps:  # same data, same dropout, same optimizer state: same loss
        assert resumed[step] == pytest.approx(killed[step], abs=1e-5), step


@pytest.mark.parametrize("layers", [0, 1])
def test_lora_targets_all_projections_or_only_the_last_layers(tiny_llama, layers):
    from llm2clip.config import CaptionContrastiveConfig
    from llm2clip.text.contrastive import add_lora
    from llm2clip.text.loading import load_model

    peft_model = add_lora(load_model(str(tiny_llama)), CaptionContrastiveConfig(lora_layers=layers))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    touched = {n.split(".layers.")[1].split(".")[0] for n in trainable}
    assert touched == ({"0", "1"} if layers == 0 else {"1"})
    projections = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    import torch

    from llm2clip.config import CaptionContrastiveConfig
    from llm2clip.losses import caption_contrastive_loss
    from llm2clip.text.contrastive import add_lora
    from llm2clip.text.encoder import CaptionEncoder, EncoderSettings

    grads = []
    for checkpointing in (False, True):
        enc = CaptionEncoder.from_pretrained(tiny_llama, EncoderSettings(), device="cpu")
        torch.manual_seed(0)
        enc.model = add_lora(enc.model, CaptionContrastiveConfig(lora_dropout=0.0), checkpointing)
        enc.train()
        q, p = enc(**enc.tokenize(["a red circle", "a blue star"])), enc(**enc.tokenize(["a red dog", "a cat"]))
        caption_contrastive_loss(q, p, scale=50.0).backward()
        assert enc.model.base_model.model.gradient_checkpointing == checkpointing
        grads.append(torch.cat([p.grad.flatten() for p in enc.model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
