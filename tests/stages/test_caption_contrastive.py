"""caption_contrastive end to end on a tiny Llama and tiny shards: the output contract."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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

DRIVER = """
import logging, sys
from llm2clip.config import load_params
from llm2clip.stages.caption_contrastive import run
logging.basicConfig(level=logging.INFO)
params = load_params(None, sys.argv[3:])
run(params.caption_contrastive, params.common, data=sys.argv[1], caption_encoder=sys.argv[2])
"""

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
    # nothing is cut at 128 tokens; every text is counted: 16 steps x 8 x (query, positive, negative),
    # the 16 CRA pairs, 2 MNTP steps x 4 captions
    none_cut = {"truncated_captions": 0, "truncated_fraction": 0.0, "truncated_tokens": 0,
                "truncated_tokens_max": 0, "max_length": 128}
    assert manifest["training"]["truncation"] == {"captions": 16 * 8 * 3, **none_cut}
    assert manifest["data"]["cra_truncation"] == {"captions": 32, **none_cut}
    assert manifest["training"]["mntp_truncation"] == {"captions": 2 * 4, **none_cut}
    assert manifest["data"]["text_pairs"] == {"ratio": 0.0, "pairs": 0, "sources": []}
    assert manifest["training"]["init_adapters"] == [] and manifest["training"]["text_pairs_per_step"] == 0
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
    for prefix in ("", "cra_", "mntp_"):
        assert run.data.metrics[f"{prefix}truncated_captions"] == 0
        assert run.data.metrics[f"{prefix}truncated_fraction"] == 0 == run.data.metrics[f"{prefix}truncated_tokens_max"]
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


def test_text_pairs_init_adapters_truncation_and_exact_resume(tmp_path):
    """Text pairs mixed in at 1/4 of the batch, an LLM2Vec-style adapter merged first, max_length 12:
    long texts are counted; a run resumed from step 3 repeats the losses and the counts exactly.

    Both runs are fresh processes, as a restarted pod (DeepSpeed keeps process-group state between
    two stage runs in one process)."""
    from peft import LoraConfig, get_peft_model

    from llm2clip.text.loading import load_model

    model = tiny_assets.make_llama(tmp_path / "model")
    data = tiny_assets.write_shards(tmp_path / "data")
    torch.manual_seed(0)
    get_peft_model(load_model(str(model)), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    rows = [{"query": f"a {c} {s}", "positive": f"a picture of a {c} {s} " + "next to a tree " * (i % 3 * 2)}
            for i, (c, s) in enumerate((c, s) for c in tiny_assets.COLOURS for s in tiny_assets.SHAPES[:4])]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    overrides = [
        f"caption_contrastive.model={model}", "caption_contrastive.prompt_template='{text}'",
        "caption_contrastive.batch_size=8", "caption_contrastive.max_steps=6", "caption_contrastive.lr=0.003",
        "caption_contrastive.checkpoint_every=3", "caption_contrastive.keep_checkpoints=2",
        "caption_contrastive.max_length=12", f"caption_contrastive.init_adapters=[{tmp_path / 'adapter'}]",
        f"caption_contrastive.text_pairs=[{{path: {tmp_path / 'pairs.jsonl'}, instruction: 'find : '}}]",
        "caption_contrastive.text_pair_ratio=0.25", "common.tracking=false",
    ]
    load_params(None, overrides)  # valid here before two processes rely on it
    out = tmp_path / "out"

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", DRIVER, str(data), str(out), *overrides], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    log = run()
    first = json.loads((out / "manifest.json").read_text())
    training = first["training"]
    assert training["text_pairs_per_step"] == 2 and first["data"]["text_pairs"]["pairs"] == 24
    assert [a["path"] for a in training["init_adapters"]] == [str(tmp_path / "adapter")]
    cut = training["truncation"]
    assert cut["captions"] == 6 * 8 * 3 and cut["truncated_captions"] > 0 and cut["max_length"] == 12
    # the longest positive: <s> + 6 + 4 x 4 words = 23 tokens, 11 over the budget
    assert 0 < cut["truncated_tokens_max"] <= 11 and cut["truncated_tokens"] >= cut["truncated_captions"]
    warnings = [line for line in log.splitlines() if line.startswith("WARNING:llm2clip.stages.caption_contrastive")]
    assert len(warnings) == 1 and f"training: {cut['truncated_captions']} of 144 captions" in warnings[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["truncated_captions"] == cut["truncated_captions"]
    assert metrics["truncated_tokens_max"] == cut["truncated_tokens_max"]

    ckpt = Path(f"{out}.ckpt")  # roll back to the step-3 checkpoint, as if the run had died at step 4
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000003", "step00000006"]
    shutil.rmtree(ckpt / "step00000006")
    (ckpt / "latest").write_text("step00000003")
    assert "resuming at step 4 of 6" in run()
    second = json.loads((out / "manifest.json").read_text())
    assert second["training"]["resumed_from"] == 3 and second["training"]["steps"] == 6
    assert second["training"]["losses"][:3] == training["losses"][:3]  # carried in the checkpoint
    assert second["training"]["losses"][3:] == pytest.approx(training["losses"][3:], abs=1e-5)
    assert second["training"]["truncation"] == cut
