"""The training core's pieces that need no process group (DeepSpeed config, schedules, optimizer
groups, precision, the shared training settings, the step loop's cadence), the train_vision step
plan and the data helpers' arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llm2clip.config import CaptionContrastiveConfig, ConfigError, TrainArgs, TrainVisionConfig, load_params
from llm2clip.io import StageError
from llm2clip.train.engine import deepspeed_config as to_deepspeed_config
from llm2clip.train.engine import effective_zero_stage
from llm2clip.train.loop import StepLoop
from llm2clip.train.optim import build_optimizer, lr_factor, trainable_groups
from llm2clip.train.precision import resolve_precision
from llm2clip.train.vision_data import batches_served, pick_caption, resolve_caption_mix
from llm2clip.train.vision_trainer import plan_training
from llm2clip.vision.model import LLM2CLIPModel

TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 8}


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32")] + [  # stage 0 + bf16/fp16: refused
    (s, p) for s in (1, 2, 3) for p in ("fp32", "bf16", "fp16")])
def test_deepspeed_config_is_derived_from_params(stage, precision):
    cfg = TrainVisionConfig(batch_size=8, gradient_accumulation_steps=3, zero_stage=stage,
                            gradient_clipping=2.5, precision=precision)
    ds = to_deepspeed_config(cfg, world_size=4, precision=precision, accumulation=3)
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 2.5
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "optimizer" not in ds and "scheduler" not in ds  # client AdamW + LambdaLR: no JIT ops
    assert "activation_checkpointing" not in ds
    assert to_deepspeed_config(dataclasses.replace(cfg, gradient_checkpointing=True), 1, precision)[
        "activation_checkpointing"]["partition_activations"] is False
    assert to_deepspeed_config(cfg, 4, precision, accumulation=3) == ds  # pure
    with pytest.raises(ValueError):
        to_deepspeed_config(cfg, 1, "auto")


def test_config_checks():
    with pytest.raises(ConfigError, match="zero_stage"):
        TrainVisionConfig(zero_stage=0, precision="bf16")
    with pytest.raises(ConfigError, match="zero_stage"):
        TrainVisionConfig(zero_stage=4)
    with pytest.raises(ConfigError, match="caption_mix"):
        TrainVisionConfig(caption_mix={"short": -1.0})
    with pytest.raises(ConfigError, match="layer_decay"):
        TrainVisionConfig(layer_decay=0.0)
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(None, ["train_vision.no_such_key=1"])
    cfg = load_params(None, ["train_vision.tower_config.hidden_size=32", "train_vision.logit_scale_init=2.5",
                             "train_vision.caption_mix={dense: 1}"]).train_vision
    assert cfg.tower_spec()["config"] == {"hidden_size": 32} and cfg.logit_scale_init == 2.5


def test_cosine_schedule_with_warmup_like_open_clip():
    factors = [lr_factor(s, warmup=2, total=10) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[2:] == sorted(factors[2:], reverse=True) and factors[-1] > 0
    assert lr_factor(10, warmup=2, total=10) == pytest.approx(0.0)
    assert lr_factor(6, warmup=2, total=10) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(7, warmup=2, total=10, schedule="constant") == 1.0
    assert lr_factor(0, warmup=0, total=5) == 1.0  # reference: no warmup


def test_optimizer_keeps_layer_decay_and_weight_decay_groups_under_the_schedule():
    model = LLM2CLIPModel.build({"kind": "vit_scratch", "config": TINY_VIT, "image_size": 32}, llm_dim=8,
                                embed_dim=4, adapter_blocks=1)
    cfg = TrainVisionConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.5, warmup_steps=2)
    optimizer, scheduler = build_optimizer(model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay),
                                           lr=cfg.lr, total_steps=10, warmup=cfg.warmup_steps, schedule="cosine")
    groups = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    by_name = {g["group_name"]: g for g in groups}
    top = model.tower.num_layers + 1
    # warmup step 0: every group runs at half its own (layer-scaled) LR
    for g in groups:
        assert g["lr"] == pytest.approx(0.5 * 1e-3 * 0.5 ** (top - g["layer_id"]))
    assert by_name[f"layer_{top}_no_decay"]["weight_decay"] == 0.0
    assert by_name[f"layer_{top}_decay"]["weight_decay"] == 0.05
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.logit_scale) in no_decay and id(model.head.bias) in no_decay
    assert id(model.head.weight) not in no_decay
    optimizer.step()
    scheduler.step()
    assert by_name["layer_0_decay"]["lr"] == pytest.approx(1e-3 * 0.5 ** top)


def test_plan_uses_open_clip_epoch_semantics():
    cfg = TrainVisionConfig(batch_size=4, epochs=3)
    plan = plan_training(cfg, train_samples=50, world_size=2, precision="fp32")
    assert (plan.steps_per_epoch, plan.total_steps, plan.global_batch) == (7, 21, 8)  # ceil(50 / 8)
    plan = plan_training(dataclasses.replace(cfg, train_num_samples=16, gradient_accumulation_steps=2),
                         50, 2, "fp32")
    assert (plan.steps_per_epoch, plan.total_steps, plan.global_batch, plan.accumulation) == (1, 3, 16, 2)
    assert plan_training(dataclasses.replace(cfg, max_steps=5), 50, 2, "fp32").total_steps == 5


def test_one_fp32_rank_runs_stage_0_and_the_optimizer_is_fused():
    cfg = TrainVisionConfig(zero_stage=2)
    assert effective_zero_stage(cfg, 1, "fp32") == 0  # nothing to partition over one rank
    assert effective_zero_stage(cfg, 2, "fp32") == 2
    assert effective_zero_stage(cfg, 1, "bf16") == 2  # fp32 masters live in the ZeRO optimizer
    model = LLM2CLIPModel.build({"kind": "vit_scratch", "config": TINY_VIT, "image_size": 32}, llm_dim=8,
                                embed_dim=4, adapter_blocks=1)
    optimizer, _ = build_optimizer(trainable_groups(model, 0.0), lr=1e-3, total_steps=3, warmup=0,
                                   schedule="cosine")
    assert optimizer.defaults["fused"] is True


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)
    gpu = torch.device("cuda", 0)  # the device type is all the resolver reads, besides bf16 support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu) == "bf16" and resolve_precision("fp16", gpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100 / T4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert resolve_precision("auto", gpu) == "fp16"  # with dynamic loss scaling (deepspeed_config)
    with pytest.raises(ValueError, match="V100 has no bf16"):
        resolve_precision("bf16", gpu)


def test_linear_schedule_is_the_hf_linear_warmup_decay():
    factors = [lr_factor(s, warmup=2, total=6, schedule="linear") for s in range(7)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(3, warmup=0, total=5, schedule="step")


def test_both_trainers_share_one_set_of_training_fields():
    shared = {f.name: f.type for f in dataclasses.fields(TrainArgs)}
    for cls in (CaptionContrastiveConfig, TrainVisionConfig):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        assert {k: fields[k] for k in shared} == shared, cls  # one type each
    assert CaptionContrastiveConfig().keep_checkpoints == 0 and TrainVisionConfig().keep_checkpoints == 2
    assert CaptionContrastiveConfig().lr == 1e-3 and TrainVisionConfig().lr == 5e-4  # per-stage defaults
    for cls, section in ((CaptionContrastiveConfig, "caption_contrastive"), (TrainVisionConfig, "train_vision")):
        with pytest.raises(ConfigError, match=f"^{section}.log_every: must be >= 1"):
            cls(log_every=0)
        with pytest.raises(ConfigError, match=f"{section}.keep_checkpoints: expected int"):
            load_params(None, [f"{section}.keep_checkpoints=false"])
    with pytest.raises(ConfigError, match="caption_contrastive.zero_stage: must be 0, 1 or 2"):
        CaptionContrastiveConfig(zero_stage=3)
    ds = to_deepspeed_config(CaptionContrastiveConfig(batch_size=4), world_size=2, precision="bf16",
                             micro_batch=16)  # MNTP's own batch
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 32


class _Engine:
    def __init__(self) -> None:
        self.saved: list[int] = []

    def train(self) -> None:
        pass


@pytest.mark.parametrize(("keep", "every", "expected"), [(0, 3, [3, 6]), (2, 3, [3, 6, 7]), (1, 0, [7]),
                                                         (0, 0, [])])
def test_step_loop_logs_windows_and_checkpoints_on_cadence(monkeypatch, keep, every, expected):
    from llm2clip.train import checkpoint
    from llm2clip.train.distributed import DistContext

    saves = []
    monkeypatch.setattr(checkpoint, "save", lambda engine, store, step, state, ctx, keep: saves.append(
        (step, state["step"], state["losses"], keep)))
    logged = []
    args = TrainArgs(log_every=3, checkpoint_every=every, keep_checkpoints=keep)
    ctx = DistContext()
    with StepLoop(_Engine(), "test", 7, args, ctx, store=object(), on_log=lambda s, m: logged.append((s, m))) as loop:
        losses = []
        for step in range(1, 8):
            losses.append(float(step))
            loop.end_step({"loss": float(step)}, lambda: {"losses": list(losses)})
    assert [s for s, _ in logged] == [3, 6, 7]
    assert [m["loss"] for _, m in logged] == [2.0, 5.0, 7.0]  # window means: (1+2+3)/3, (4+5+6)/3, 7
    assert [s for s, *_ in saves] == expected
    assert all(step == inner and len(state) == step and k == max(1, keep) for step, inner, state, k in saves)


def test_worker_rotation_covers_every_micro_batch_once():
    """Resuming at micro-batch k, worker w plays stream (w + k) % W and skips what it served."""
    for streams in (1, 2, 3):
        for start in range(0, 9):
            total = 11
            served = {}
            for worker in range(streams):
                stream = (worker + start) % streams
                skip = batches_served(start, stream, streams)
                count = batches_served(total - start, worker, streams)
                for m in range(count):  # the worker's m-th batch is global batch start + w + m*W
                    served[start + worker + m * streams] = (stream, skip + m)
            assert sorted(served) == list(range(start, total))
            assert all(s == i % streams and n == i // streams for i, (s, n) in served.items())


def test_caption_mix_and_pick():
    import random

    import numpy as np

    assert resolve_caption_mix({}, ("short", "dense"), ["short", "dense"]) == (("short", "dense"), (0.5, 0.5))
    assert resolve_caption_mix({"dense": 3, "short": 1}, ("short", "dense"), ["short", "dense"]) == (
        ("short", "dense"), (0.25, 0.75))
    with pytest.raises(StageError, match="caption_mix"):
        resolve_caption_mix({"long": 1}, ("short", "dense"), ["short", "dense"])
    arrays = {"short": np.zeros((1, 2)), "dense": np.arange(6.0).reshape(3, 2)}
    rng = random.Random(0)
    picks = [pick_caption(arrays, ("short", "dense"), (0.5, 0.5), rng) for _ in range(400)]
    share = sum(f == "dense" for _, f in picks) / len(picks)
    assert 0.4 < share < 0.6
    rows = {tuple(v) for v, f in picks if f == "dense"}
    assert rows == {(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)}  # one of the k captions at random
    only_short = {"short": np.zeros((1, 2)), "dense": np.zeros((0, 2))}
    assert {pick_caption(only_short, ("short", "dense"), (0.5, 0.5), rng)[1] for _ in range(20)} == {"short"}
    with pytest.raises(StageError):
        pick_caption({}, ("short",), (1.0,), rng, "k1")
    assert math.isclose(sum(resolve_caption_mix({"a": 2, "b": 0}, ("a", "b"), ["a", "b"])[1]), 1.0)
