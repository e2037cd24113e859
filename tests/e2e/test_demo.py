"""The demo profile end to end on the real demo models (SmolLM2-135M, demo scenes + emoji).

The one slow test: every stage through the CLI, as ``dvc repro`` runs them, with the committed
params.yaml shrunk (fewer images and steps) so it fits CI. It checks the things the demo exists
to show: caption-contrastive tuning raises CRA, the trained model retrieves far above chance,
and the registered champion loads in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

PINNED = {"cra_before": 0.021429, "cra_after": 0.085714, "val.mean_R_at_1": 0.082143,
          "val.chance_R_at_1": 0.014286, "val.zeroshot.top1": 0.157143}


def demo_params(workdir: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["common"].update(tracking=True, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                         registered_model="llm2clip-demo")
    for source in raw["prepare_data"]["sources"]:
        source["count"] = 240
    for spec in raw["eval_data"].values():  # the demo's eval sets, smaller; the folder's path: the test's
        for source in spec["sources"]:
            if source["kind"] == "synthetic":
                source["count"] = 60
            else:
                source["path"] = str(workdir / "demo" / "shapes_imagenet" / "val")
    raw["caption_contrastive"].update(max_steps=40, warmup_steps=4, checkpoint_every=20)
    raw["train_vision"].update(max_steps=min(raw["train_vision"].get("max_steps", 0) or 150, 150))
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def check_demo_eval_sets(report: Path, metrics: dict) -> None:
    """The report's paper-layout table has the demo's in-domain, long-caption, cross-lingual and
    zero-shot-folder columns, each from its set's headline protocol, and the honest caveat."""
    print("E2E eval sets " + json.dumps({k: round(v, 4) for k, v in metrics.items() if ".headline." in k
                                         or ".zeroshot" in k}))
    assert metrics["long.images"] == 60 and metrics["crosslingual.images"] == 60
    assert metrics["shapes.images"] == 48 and metrics["shapes.zeroshot.templates"] == 80
    for name in ("long", "crosslingual"):
        for direction in ("image_to_text", "text_to_image"):
            r1, r10 = (metrics[f"{name}.headline.{direction}_R_at_{k}"] for k in (1, 10))
            assert 0 <= r1 <= r10 <= 1
    # one caption per image: the headline is 1:1, the first caption of the headline field
    assert metrics["long.headline.image_to_text_R_at_1"] == metrics["long.long.image_to_text_R_at_1"]
    assert metrics["crosslingual.headline.text_to_image_R_at_1"] == metrics["crosslingual.de.text_to_image_R_at_1"]
    assert 0 <= metrics["shapes.zeroshot_single.top1"] <= 1 and 0 <= metrics["shapes.zeroshot.top1"] <= 1
    table = json.loads((report / "paper_table.json").read_text())
    groups = {c["group"] for c in table["columns"]}
    assert {"in-domain", "long-caption (synthetic)", "crosslingual", "zero-shot (demo folder)"} <= groups, groups
    assert table["rows"][0]["name"] == "this model" and table["published"] is None  # not a released model
    text = (report / "report.md").read_text()
    assert "Cross-lingual" in text and "expected" in text  # the low-numbers caveat of a small English LLM


def stage(name: str, params: Path, cwd: Path, **paths: Path) -> None:
    flags = [a for k, v in paths.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    done = subprocess.run([sys.executable, "-m", "llm2clip", name, "--params", str(params), *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-6000:]}"


def test_demo_pipeline_on_the_real_models(tmp_path):
    params = demo_params(tmp_path)
    data, enc, emb = tmp_path / "data", tmp_path / "caption_encoder", tmp_path / "embeddings"
    vision, report, reg = tmp_path / "vision", tmp_path / "report", tmp_path / "registration"
    # the GGUF -> safetensors cache is shared with `make run` (params: .cache/models, relative)
    stage("prepare_data", params, REPO, data=data)
    stage("caption_contrastive", params, REPO, data=data, caption_encoder=enc)
    stage("embed_captions", params, REPO, data=data, caption_encoder=enc, embeddings=emb)
    stage("train_vision", params, REPO, data=data, embeddings=emb, vision_model=vision)
    # the eval sets, as dvc.yaml's demo_inputs, prepare_eval@NAME and embed_eval@NAME run them
    folder = subprocess.run([sys.executable, "-m", "llm2clip.data.demo_folder",
                             str(tmp_path / "demo" / "shapes_imagenet")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert folder.returncode == 0, folder.stderr
    eval_sets = list(yaml.safe_load(params.read_text())["eval_data"])
    for name in eval_sets:
        stage("prepare_data", params, REPO, eval_set=name, data=tmp_path / "eval" / name)
        stage("embed_captions", params, REPO, eval_set=name, data=tmp_path / "eval" / name, caption_encoder=enc,
              embeddings=tmp_path / "eval_emb" / name)
    stage("evaluate", params, REPO, data=data, embeddings=emb, vision_model=vision, report=report,
          eval_data=tmp_path / "eval", eval_embeddings=tmp_path / "eval_emb")
    stage("register", params, REPO, vision_model=vision, caption_encoder=enc, report=report,
          registration=reg)

    cc = json.loads((enc / "manifest.json").read_text())
    # 40 CPU steps on 480 images only start the climb (24 steps: 0.021 -> 0.029); the clear
    # margin of the full demo (60 steps: 0.003 -> 0.23) is in docs/benchmarks.md
    assert cc["cra_after"]["cra"] > cc["cra_before"]["cra"], (cc["cra_before"], cc["cra_after"])
    metrics = json.loads((report / "metrics.json").read_text())
    got = {"cra_before": cc["cra_before"]["cra"], "cra_after": cc["cra_after"]["cra"],
           **{k: metrics[k] for k in ("val.mean_R_at_1", "val.chance_R_at_1", "val.zeroshot.top1")}}
    print("E2E " + json.dumps(got))
    # Pinned before the training core was refactored (issue #12): a refactor must not move them.
    # The tolerance is one CRA pair / one retrieval hit of the 140 val pairs (another CPU's
    # summation order can flip a near-tie), far below what a real change does.
    assert got == pytest.approx(PINNED, abs=1.01 / 140), got
    assert metrics["val.mean_R_at_1"] > 4 * metrics["val.chance_R_at_1"], metrics
    check_demo_eval_sets(report, metrics)
    registration = json.loads((reg / "registration.json").read_text())
    assert "champion" in registration["aliases"]

    probe = (
        "import io, json, mlflow, pandas as pd\n"
        "from PIL import Image\n"
        "m = mlflow.pyfunc.load_model('models:/llm2clip-demo@champion')\n"
        "buf = io.BytesIO(); Image.new('RGB', (64, 64), (0, 90, 200)).save(buf, 'PNG')\n"
        "out = m.predict(pd.DataFrame({'image': [buf.getvalue(), None], 'caption': [None, 'a blue square']}))\n"
        "img, txt = out['image_embedding'][0], out['text_embedding'][1]\n"
        "print(json.dumps([len(img), len(txt), sum(v * v for v in img), sum(v * v for v in txt)]))\n"
    )
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    dim_img, dim_txt, norm_img, norm_txt = json.loads(done.stdout.strip().splitlines()[-1])
    assert dim_img == dim_txt and norm_img == pytest.approx(1.0, abs=1e-4) == norm_txt
