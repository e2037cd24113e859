"""caption_contrastive end to end on a tiny Llama and tiny shards: the output contract."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2clip.config import load_params
from llm2clip.io import sha256_file
from llm2clip.stages import caption_contrastive

_spec = importlib.util.spec_from_file_location(
    "tiny_assets", Path(__file__).resolve().parents[1] / "unit" / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

PROBE = """
import json, sys, torch
from llm2clip.text import CaptionEncoder
out = sys.argv[1]
probe = json.load(open(f"{out}/manifest.json"))["probe"]
enc = CaptionEncoder.from_pretrained(out, device="cpu")
got = enc.encode(probe["texts"])
diff = (got - torch.tensor(probe["embeddings"])).abs().max().item()
print(json.dumps({"diff": diff, "settings": enc.settings.to_dict()}))
"""


@pytest.fixture(scope="module")
def stage_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_contrastive")
    model = tiny_assets.make_llama(root / "model")
    data = tiny_assets.write_shards(root / "data")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    params = load_params(None, [
        f"caption_contrastive.model={model}",
        "caption_contrastive.prompt_template='[INST] {instruction}{text} [/INST]'",
        "caption_contrastive.instruction='blue star : '",
        "caption_contrastive.batch_size=8", "caption_contrastive.max_steps=16",
        "caption_contrastive.warmup_steps=2", "caption_contrastive.lr=0.003",
        "caption_contrastive.checkpoint_every=5", "caption_contrastive.log_every=4",
        "caption_contrastive.mntp_steps=2", "caption_contrastive.mntp_batch_size=4",
        f"common.tracking_uri={tracking}",
    ])
    result = caption_contrastive.run(params.caption_contrastive, params.common, data=str(data),
                                     caption_encoder=str(root / "out"), pipeline_run_id="test-pipe")
    return root, result, tracking


def test_result_and_training(stage_output):
    root, result, _ = stage_output
    assert result.steps == 16 and result.resumed_from == 0
    assert result.train_images == 48 and result.cra_pairs == 16
    assert result.cra_after > result.cra_before  # the tiny model learns the synthetic scenes
    assert not Path(f"{root / 'out'}.ckpt").exists()
    assert "RANK" not in os.environ and not torch.distributed.is_initialized()  # cleaned up


def test_output_contract(stage_output):
    root, result, _ = stage_output
    out = root / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm2clip_text_encoder.json",
                 "training_curve.png", "metrics.json", "manifest.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "caption_contrastive"
    assert manifest["cra_protocol"].startswith("val first-two-captions")
    assert manifest["cra_before"]["cra"] == result.cra_before
    assert manifest["cra_after"]["cra"] == result.cra_after
    assert manifest["settings"]["query_instruction"] == "blue star : "
    assert manifest["settings"]["bidirectional"] and manifest["settings"]["pooling"] == "mean"
    assert manifest["training"]["steps"] == 16 and manifest["training"]["mntp_steps"] == 2
    assert manifest["data"]["train_images"] == 48 and manifest["embedding_dim"] == 32
    assert len(manifest["config_hash"]) == 16 and manifest["base_model"].endswith("model")
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cra_after"] == result.cra_after and metrics["steps"] == 16
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaModel"]


def test_mlflow_run(stage_output):
    from mlflow.tracking import MlflowClient

    _, result, tracking = stage_output
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("llm2clip").experiment_id],
                              filter_string="tags.`llm2clip.stage` = 'caption_contrastive'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cra_after"] == pytest.approx(result.cra_after)
    assert run.data.metrics["cra_before"] == pytest.approx(result.cra_before)
    assert run.data.params["caption_contrastive.max_steps"] == "16"
    assert run.data.tags["llm2clip.pipeline_run_id"] == "test-pipe"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [4, 8, 12, 16]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curve.png", "metrics.json", "manifest.json"} <= artifacts


def test_merged_model_embeds_identically_in_a_fresh_process(stage_output):
    root, _, _ = stage_output
    done = subprocess.run([sys.executable, "-c", PROBE, str(root / "out")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["diff"] <= 1e-5
    assert report["settings"]["prompt_template"] == "[INST] {instruction}{text} [/INST]"
