"""evaluate -> register on tiny real inputs, against a real mlflow server.

Chain: prepare_data (synthetic scenes) -> embed_captions (tiny random Llama encoder) -> a tiny
LLM2CLIPModel (vit_scratch) exported as train_vision would -> evaluate -> register.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2clip.config import (
    CommonConfig,
    EmbedCaptionsConfig,
    EvalSet,
    EvaluateConfig,
    PrepareDataConfig,
    RegisterConfig,
    SyntheticSource,
    ValidationConfig,
)
from llm2clip.io import StageError
from llm2clip.stages import embed_captions, evaluate, prepare_data, register
from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings
from llm2clip.vision.model import LLM2CLIPModel

_spec = importlib.util.spec_from_file_location(
    "tiny_assets", Path(__file__).resolve().parents[1] / "unit" / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

OFF = CommonConfig(tracking=False)
TOWER = {"kind": "vit_scratch", "image_size": 32,
         "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Prepared data, a tiny caption encoder, its embeddings and an exported vision model."""
    root = tmp_path_factory.mktemp("chain")
    data, emb = root / "data", root / "embeddings"
    prepare_data.run(PrepareDataConfig(
        sources=(SyntheticSource(name="scenes", count=60, image_size=48),), val_fraction=0.3,
        shard_size=16, image_max_side=48, validation=ValidationConfig(min_valid_fraction=0.5)),
        OFF, data=str(data))
    encoder = tiny_assets.make_llama(root / "encoder", causal_lm=False)
    (encoder / SETTINGS_FILE).write_text(json.dumps(EncoderSettings(padding_side="left").to_dict()))
    (encoder / "manifest.json").write_text(json.dumps({"stage": "caption_contrastive"}))
    embed_captions.run(EmbedCaptionsConfig(device="cpu"), OFF, data=str(data),
                       caption_encoder=str(encoder), embeddings=str(emb))
    torch.manual_seed(0)
    model = LLM2CLIPModel.build(TOWER, llm_dim=32, embed_dim=16)
    model.save_pretrained(root / "vision")  # what train_vision exports, with its manifest
    (root / "vision" / "manifest.json").write_text(json.dumps({"stage": "train_vision", "steps": 0}))
    return {"data": str(data), "embeddings": str(emb), "vision_model": str(root / "vision"),
            "caption_encoder": str(encoder), "root": root}


def _evaluate(chain, out: Path, common: CommonConfig, **cfg) -> evaluate.EvaluateResult:
    return evaluate.run(EvaluateConfig(**cfg), common, data=chain["data"], embeddings=chain["embeddings"],
                        vision_model=chain["vision_model"], report=str(out))


def test_evaluate_writes_metrics_plots_report_and_gate(chain, tmp_path):
    result = _evaluate(chain, tmp_path / "report", OFF, compare_champion=False, recall_max_k=5,
                       eval_sets=(EvalSet(), EvalSet(name="train", split="train")))
    out = tmp_path / "report"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    n_val = metrics["val.images"]
    for field in ("short", "dense"):
        for key in ("image_to_text_R_at_1", "text_to_image_R_at_10", "image_to_text_median_rank",
                    "multi_image_to_text_R_at_1", "multi_text_to_image_R_at_5"):
            assert 0.0 <= metrics[f"val.{field}.{key}"] <= max(1.0, n_val)
    # the headline is the mean of the four 1:1 R@1 numbers (two fields x two directions)
    r1 = [metrics[f"val.{f}.{d}_R_at_1"] for f in ("short", "dense") for d in ("image_to_text", "text_to_image")]
    assert metrics["val.mean_R_at_1"] == pytest.approx(sum(r1) / 4)
    assert metrics["val.chance_R_at_1"] == pytest.approx(1 / n_val)
    assert metrics["train.images"] > n_val  # the second eval set was evaluated on its own split
    # labelled synthetic scenes -> zero-shot over the class prompts embed_captions made
    assert 0.0 <= metrics["val.zeroshot.top1"] <= metrics["val.zeroshot.top5"] <= 1.0
    assert manifest["gate_passed"] is True and metrics["gate_passed"] == 1.0
    assert manifest["primary"] == result.primary == metrics["val.mean_R_at_1"]
    assert set(manifest["inputs"]) == {"data", "embeddings", "vision_model"}
    rows = list(csv.DictReader(open(out / "plots" / "recall_val.csv")))
    assert {r["direction"] for r in rows} == {f"{f}/{d}" for f in ("short", "dense")
                                              for d in ("image_to_text", "text_to_image")}
    assert max(int(r["k"]) for r in rows) == 5
    html = (out / "report.html").read_text()
    assert "val.mean_R_at_1" in html and "data:image/png;base64," in html


def test_gate_failure_is_recorded_and_register_refuses(chain, tmp_path, mlflow_server):
    common = CommonConfig(tracking_uri=mlflow_server, experiment="t-gate", registered_model="t-gate")
    result = _evaluate(chain, tmp_path / "report", common, min_primary=1.01, compare_champion=False)
    assert result.gate_passed is False
    with pytest.raises(StageError, match="quality gate failed"):
        register.run(RegisterConfig(), common, vision_model=chain["vision_model"],
                     caption_encoder=chain["caption_encoder"], report=str(tmp_path / "report"),
                     registration=str(tmp_path / "reg"))
    assert not (tmp_path / "reg" / "manifest.json").exists()


def test_register_refuses_without_evaluation(chain, tmp_path, mlflow_server):
    common = CommonConfig(tracking_uri=mlflow_server, experiment="t-noeval")
    with pytest.raises(StageError, match="manifest.json not found"):
        register.run(RegisterConfig(), common, vision_model=chain["vision_model"],
                     caption_encoder=chain["caption_encoder"], report=str(tmp_path / "missing"),
                     registration=str(tmp_path / "reg"))


def test_register_promotes_then_reuses_and_evaluate_compares_with_champion(chain, tmp_path, mlflow_server):
    common = CommonConfig(tracking_uri=mlflow_server, experiment="t-reg", registered_model="t-reg")
    _evaluate(chain, tmp_path / "report", common)
    kwargs = dict(vision_model=chain["vision_model"], caption_encoder=chain["caption_encoder"],
                  report=str(tmp_path / "report"))
    first = register.run(RegisterConfig(), common, **kwargs, registration=str(tmp_path / "reg1"))
    assert first.promoted and set(first.aliases) == {"champion", "challenger"}
    again = register.run(RegisterConfig(), common, **kwargs, registration=str(tmp_path / "reg2"))
    assert again.reused and again.version == first.version
    record = json.loads((tmp_path / "reg1" / "registration.json").read_text())
    assert record["champion_uri"] == "models:/t-reg@champion"
    # a second evaluation now shows the champion's numbers next to its own
    _evaluate(chain, tmp_path / "report2", common)
    manifest = json.loads((tmp_path / "report2" / "manifest.json").read_text())
    assert manifest["champion"]["val.mean_R_at_1"] == pytest.approx(manifest["primary"])
    # the champion loads in a fresh process and embeds like the exported model
    probe = (
        "import sys, json, io, numpy as np, pandas as pd, mlflow\n"
        "from PIL import Image\n"
        "m = mlflow.pyfunc.load_model('models:/t-reg@champion')\n"
        "img = Image.new('RGB', (40, 40), (200, 30, 30)); buf = io.BytesIO(); img.save(buf, 'PNG')\n"
        "out = m.predict(pd.DataFrame({'image': [buf.getvalue()]}))\n"
        "print(json.dumps(list(map(float, out['image_embedding'][0]))))\n"
    )
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    served = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    from PIL import Image

    local = LLM2CLIPModel.from_pretrained(chain["vision_model"]).encode_image(
        [Image.new("RGB", (40, 40), (200, 30, 30))])[0]
    assert torch.allclose(served, local, atol=1e-5)
