"""Each paper profile end to end on CPU, with only its sizes and locations shrunk.

The profile file itself is loaded (``extends:`` included); the overrides below replace what cannot
exist on a CPU box (S3 sources, the 8B Llama, the pretrained towers, GPUs, 4 epochs) with tiny
stand-ins of the same kind: synthetic scenes, a random Llama with Llama-3's chat template and two
LoRA adapters to merge, a JSONL of text pairs, a tiny CLIP / EVA02 tower built from config. Every
other key keeps the profile's value, so the run takes the profile's code paths: bidirectional
mean pooling with the instruction, adapters merged at load, text pairs mixed into the batches,
512-token captions with truncation counts, layer decay 0.85, cached-feature accumulation,
gradient checkpointing, the SigLIP/CLIP loss the tower asks for, evaluate and register.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("tiny_assets", REPO / "tests/unit/text/tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

TOWERS = {  # tiny shapes of the profiles' towers, built from config (no pretrained dir)
    "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "patch_size": 8, "image_size": 32},
    "eva02": {"width": 32, "layers": 2, "heads": 4, "patch_size": 8, "image_size": 32},
}


def write_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on the tiny Llama, saved as peft saves LLM2Vec's (random, small)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    torch.manual_seed(seed)
    model = get_peft_model(LlamaModel.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def tiny_coco(root: Path, images: int = 12) -> Path:
    """A COCO Karpathy split in its public layout (``dataset_coco.json`` + ``val2014/``), tiny:
    ``images`` test images with 6 captions each (the profile keeps the first 5) and one train image."""
    from PIL import Image

    (root / "val2014").mkdir(parents=True)
    entries = []
    for i in range(images + 1):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (48, 40), (20 * i % 255, 90, 255 - 15 * i % 255)).save(root / "val2014" / name)
        raws = [f"picture {i} caption {j}, a colour patch number {i}" for j in range(6)]
        entries.append({"filepath": "val2014", "filename": name, "imgid": i, "cocoid": 1000 + i,
                        "split": "test" if i < images else "train", "sentids": list(range(6 * i, 6 * i + 6)),
                        "sentences": [{"raw": r, "tokens": r.split(), "imgid": i, "sentid": 6 * i + j}
                                      for j, r in enumerate(raws)]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path


def tiny_profile(profile: str, root: Path) -> Path:
    """``profile`` as a small file that ``extends:`` it and shrinks sizes and locations only."""
    model = tiny_assets.make_llama(root / "llama")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"a {c} {s}", "positive": f"the {s} is {c}",
                                         "negative": f"two {c} boats"}) + "\n"
                             for c in ("red", "blue", "green", "white") for s in ("circle", "star", "cat")))
    base = yaml.safe_load((REPO / "params" / profile).read_text())
    tower = base.get("train_vision", {}).get("tower") or yaml.safe_load(
        (REPO / "params" / base["extends"]).read_text())["train_vision"]["tower"]
    overrides = {
        "extends": str(REPO / "params" / profile),
        "common": {"tracking": True, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "prepare_data": {"sources": [{"kind": "synthetic", "name": "scenes", "count": 72, "image_size": 64}],
                         "val_fraction": 0.25, "shard_size": 24, "image_max_side": 64,
                         "validation": {"min_valid_fraction": 0.5}},
        "caption_contrastive": {
            "nproc_per_node": 1, "model": str(model), "precision": "fp32", "max_steps": 4, "warmup_steps": 1,
            "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "cra_max_images": 0, "encode_batch_size": 16,
            "init_adapters": [str(write_adapter(model, root / "mntp", 1)), str(write_adapter(model, root / "sup", 2))],
            "text_pairs": [{"path": str(pairs)}]},
        "embed_captions": {"device": "cpu", "precision": "fp32", "threads": 1},
        "train_vision": {"nproc_per_node": 1, "tower_path": "", "tower_config": TOWERS[tower], "image_size": 32,
                         "embed_dim": 16, "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
                         "precision": "fp32", "workers": 0, "shuffle_buffer": 16, "checkpoint_every": 2,
                         "log_every": 1, "val_batch_size": 16, "lr": 1.0e-4},
        # the profile's COCO set (multi-caption headline, CRA) on a tiny COCO in the same layout
        "eval_data": {"coco": {"sources": [{"kind": "karpathy", "name": "coco", "path": str(tiny_coco(root / "coco")),
                                            "image_root": str(root / "coco"), "split": "test",
                                            "caption_field": "captions", "max_captions": 5}],
                               "shard_size": 8, "image_max_side": 64}},
        "evaluate": {"batch_size": 16, "eval_sets": [
            {"name": "val", "split": "val", "column": "in-domain"},
            {"name": "coco", "eval_data": "coco", "protocol": "multi_caption", "column": "coco", "cra": True}]},
    }
    path = root / f"tiny-{profile}"
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def stage(name: str, params: Path, cwd: Path, **paths: Path) -> None:
    flags = [a for k, v in paths.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "llm2clip", name, "--params", str(params), *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("profile", ["paper-openai-l14-336.yaml", "paper-eva02-l14-336.yaml"])
def test_a_paper_profile_runs_end_to_end_on_tiny_shapes(profile, tmp_path):
    from llm2clip.config import load_params

    params = tiny_profile(profile, tmp_path)
    loaded, full = load_params(params), load_params(REPO / "params" / profile)
    # only sizes and locations moved: the recipe's switches are the profile's own
    for section, key in (("caption_contrastive", "max_length"), ("caption_contrastive", "instruction"),
                         ("caption_contrastive", "text_pair_ratio"), ("caption_contrastive", "lora_layers"),
                         ("train_vision", "accumulation"), ("train_vision", "layer_decay"),
                         ("train_vision", "gradient_checkpointing"), ("train_vision", "tower"),
                         ("train_vision", "loss"), ("embed_captions", "max_length")):
        assert getattr(loaded.section(section), key) == getattr(full.section(section), key), (section, key)

    out = {name: tmp_path / name for name in ("data", "encoder", "emb", "vision", "report", "reg")}
    stage("prepare_data", params, tmp_path, data=out["data"])
    stage("caption_contrastive", params, tmp_path, data=out["data"], caption_encoder=out["encoder"])
    stage("embed_captions", params, tmp_path, data=out["data"], caption_encoder=out["encoder"],
          embeddings=out["emb"])
    stage("train_vision", params, tmp_path, data=out["data"], embeddings=out["emb"], vision_model=out["vision"])
    stage("prepare_data", params, tmp_path, eval_set="coco", data=tmp_path / "eval" / "coco")
    stage("embed_captions", params, tmp_path, eval_set="coco", data=tmp_path / "eval" / "coco",
          caption_encoder=out["encoder"], embeddings=tmp_path / "eval_emb" / "coco")
    stage("evaluate", params, tmp_path, data=out["data"], embeddings=out["emb"], vision_model=out["vision"],
          report=out["report"], eval_data=tmp_path / "eval", eval_embeddings=tmp_path / "eval_emb")
    stage("register", params, tmp_path, vision_model=out["vision"], caption_encoder=out["encoder"],
          report=out["report"], registration=out["reg"])

    cc = json.loads((out["encoder"] / "manifest.json").read_text())
    assert len(cc["training"]["init_adapters"]) == 2 and cc["training"]["text_pairs_per_step"] > 0
    assert cc["settings"]["max_length"] == 512 and cc["settings"]["bidirectional"]
    assert "truncation" in cc["training"]
    tv = json.loads((out["vision"] / "manifest.json").read_text())
    config = json.loads((out["vision"] / "llm2clip_config.json").read_text())
    assert config["tower"]["spec"]["kind"] == full.train_vision.tower and config["loss"] == "clip"
    assert tv["training"]["global_batch"] == 8  # 4 x 2 cached-feature micro-batches
    metrics = json.loads((out["report"] / "metrics.json").read_text())
    assert metrics["coco.images"] == 12 and metrics["coco.cra.pairs"] == 12  # 12 test images, 5 captions kept
    assert 0 <= metrics["coco.headline.image_to_text_R_at_1"] <= 1 and "coco.headline.mean_R_at_1" in metrics
    assert "coco" in (out["report"] / "paper_table.json").read_text()
    registration = json.loads((out["reg"] / "registration.json").read_text())
    assert "champion" in registration["aliases"]  # the first version of the profile's registered model
