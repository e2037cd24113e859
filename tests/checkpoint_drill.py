"""Helpers for the checkpoint-store drills (tests/test_checkpoint_s3_faults.py): tiny train_vision
inputs, a tiny real DeepSpeed engine, and what a checkpoint store on S3 holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import boto3
import torch

from llm2clip.config import CommonConfig, PrepareDataConfig, SyntheticSource, ValidationConfig
from llm2clip.stages import prepare_data

# The train_vision tests' bag-of-words caption embeddings, written in the embed_captions format.
_spec = importlib.util.spec_from_file_location("train_vision_helpers",
                                               Path(__file__).parent / "stages" / "test_train_vision.py")
tv_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tv_helpers)


def vision_inputs(root: Path) -> tuple[str, str]:
    """``(data, embeddings)``: 32 synthetic scenes (prepare_data) and their caption embeddings in
    the embed_captions format (what train_vision verifies and reads)."""
    data, emb = root / "data", root / "emb"
    cfg = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=32, image_size=48),), val_fraction=0.25,
                            shard_size=16, image_max_side=48, workers=1,
                            validation=ValidationConfig(min_valid_fraction=0.5))
    prepare_data.run(cfg, CommonConfig(tracking=False), data=str(data))
    emb.mkdir()
    tv_helpers.write_embeddings(data, emb)
    return str(data), str(emb)


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (key relative to it) -> its bytes, read without the proxy."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def tiny_engine(seed: int):
    """A real DeepSpeed engine (ZeRO-1, fp32, AdamW + schedule) over a 200-parameter MLP; its
    checkpoint is 2 files (the model states, then the optimizer's partition)."""
    import deepspeed

    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def train_steps(engine, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=generator)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


def state(engine) -> dict[str, torch.Tensor]:
    """What a resume must restore: the weights, AdamW's moments and step (ZeRO's flat fp32
    partition), the schedule's position and the engine's step counter."""
    out = {f"w.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client AdamW
    for i, (_, s) in enumerate(sorted(adam.state_dict()["state"].items())):
        out |= {f"adam.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()}
    out |= {"lr_step": torch.tensor(engine.lr_scheduler.last_epoch), "global_steps": torch.tensor(engine.global_steps)}
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def vision_config():
    """train_vision on a 26k-parameter ViT: 4 steps of 4 samples, a checkpoint at steps 2 and 4."""
    from tiny_pipeline import TINY_TOWER

    from llm2clip.config import TrainVisionConfig

    tower = {k: v for k, v in TINY_TOWER.items() if k != "image_size"}
    return TrainVisionConfig(tower="vit_scratch", tower_config=tower, image_size=32, embed_dim=16, adapter_blocks=1,
                             batch_size=4, max_steps=4, warmup_steps=1, workers=0, shuffle_buffer=8,
                             checkpoint_every=2, keep_checkpoints=2, log_every=2, val_batch_size=8, precision="fp32")
