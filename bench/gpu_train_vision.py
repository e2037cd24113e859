"""GPU throughput of the train_vision trainer: ViT-B/16 + LLM2CLIP adapter, bf16, ZeRO-1.

Trains a ``vit_scratch`` tower with the ViT-B/16 shape (hidden 768, 12 layers, 12 heads, patch 16,
224 px) plus the reference adapter (4096 -> 1280, Llama-3-8B embedding width) on synthetic tensors,
through the same code the stage runs (:func:`llm2clip.train.vision_trainer.train`, DeepSpeed,
gathered CLIP loss, logit-scale clamp). Prints samples/s (total and per GPU) and the model FLOP
utilisation against the GPU's bf16 dense peak. Launched by ``bench/gpu_train_vision.sh``;
``--dry-run`` runs tiny sizes on CPU (what CI checks).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

from llm2clip.config import TrainVisionConfig
from llm2clip.losses import LOSSES, create_loss
from llm2clip.train.distributed import init_distributed
from llm2clip.train.precision import resolve_precision
from llm2clip.train.vision_trainer import TrainPlan, train, training_flops
from llm2clip.vision.model import LLM2CLIPModel

VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "patch_size": 16, "image_size": 224}
VIT_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "patch_size": 14, "image_size": 336}  # OpenAI ViT-L/14-336, the paper's main tower
# --shape -> (tower kind, tower config); every one with random weights
SHAPES = {"vit-b-16": ("vit_scratch", VIT_B16), "vit-l-14-336": ("vit_scratch", VIT_L14_336),
          "eva02-l-14-336": ("eva02", {"preset": "EVA02-CLIP-L-14-336", "image_size": 336}),
          "eva02-b-16": ("eva02", {"preset": "EVA02-CLIP-B-16", "image_size": 224})}
AUTO_BATCHES = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 32)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "patch_size": 8, "image_size": 32}
H100_BF16_DENSE_TFLOPS = 989.4  # H100/H200 SXM, dense (no sparsity)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, fp32 (CI check)")
    p.add_argument("--batch-size", type=int, default=256,
                   help=f"samples per GPU and step; 0 = the largest of {AUTO_BATCHES} whose plain step fits "
                        "in 85%% of the GPU's memory")
    p.add_argument("--shape", choices=sorted(SHAPES), default="vit-b-16",
                   help="the tower's kind and shape (random weights)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput")
    p.add_argument("--llm-dim", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=1280)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--accumulation", default="sum", choices=("sum", "cached_features"),
                   help="train_vision.accumulation (cached_features: negatives span every micro-batch)")
    p.add_argument("--loss", default="clip", help="a name in llm2clip.losses.LOSSES (clip, siglip)")
    p.add_argument("--no-peer", action="store_true",
                   help="skip the peer: a plain PyTorch loop (autocast, fused AdamW, no DeepSpeed) on one GPU")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the GPU's dense bf16 peak per device (default: H100/H200 SXM)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch_size, args.steps, args.warmup, args.llm_dim, args.embed_dim = 4, 4, 1, 16, 8
        args.precision = "fp32" if not torch.cuda.is_available() else args.precision
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = init_distributed()
    try:
        kind, vit = ("vit_scratch", TINY) if args.dry_run else SHAPES[args.shape]
        if args.batch_size == 0:
            args.batch_size = largest_batch(kind, vit, args, ctx.device)
        cfg = TrainVisionConfig(tower=kind, tower_config=vit, image_size=vit["image_size"], loss=args.loss,
                                embed_dim=args.embed_dim, batch_size=args.batch_size, max_steps=args.steps,
                                lr=1e-5, warmup_steps=0, weight_decay=0.05, zero_stage=args.zero_stage,
                                precision=args.precision, gradient_clipping=5.0, log_every=10**9,
                                gradient_checkpointing=args.gradient_checkpointing, workers=0,
                                gradient_accumulation_steps=args.accum_steps, accumulation=args.accumulation)
        precision = resolve_precision(cfg.precision, ctx.device)
        loss = LOSSES[args.loss]

        def new_model() -> LLM2CLIPModel:
            torch.manual_seed(0)
            return LLM2CLIPModel.build(
                cfg.tower_spec(), llm_dim=args.llm_dim, embed_dim=args.embed_dim, loss=args.loss,
                logit_scale_init=loss.init_logit_scale,
                logit_bias_init=loss.init_logit_bias if loss.needs_bias else None).to(ctx.device)

        model = new_model()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        size = vit["image_size"]
        batch = {"pixels": torch.randn(args.batch_size, 3, size, size, device=ctx.device).to(dtype),
                 "text": torch.randn(args.batch_size, args.llm_dim, device=ctx.device)}
        flops_per_sample = training_flops(model, batch["pixels"][:2].float(), batch["text"][:2]) / 2
        plan = TrainPlan(args.steps, args.steps, args.batch_size * ctx.world_size * args.accum_steps,
                         args.accum_steps, precision)
        started = time.perf_counter()
        outcome = train(model, cfg, plan=plan, batches=lambda start, total: (batch for _ in range(start, total)),
                        ctx=ctx, seed=0, ckpt_dir=None)
        wall = time.perf_counter() - started
        final_loss = outcome.history["loss"][-1]
        n_params = sum(p.numel() for p in model.parameters())
        peak_mem = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
        steady = outcome.history["samples_per_second"][args.warmup:] or outcome.history["samples_per_second"]
        samples_s = statistics.median(steady)
        peer = None
        if not args.no_peer and ctx.world_size == 1 and args.accum_steps == 1:
            del model, outcome
            torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
            peer = plain_loop(new_model(), cfg, args, {"pixels": batch["pixels"].float(), "text": batch["text"]},
                              precision)
        achieved = samples_s * flops_per_sample / ctx.world_size  # FLOP/s per device
        report = {
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "world_size": ctx.world_size, "precision": precision, "zero_stage": args.zero_stage,
            "accum_steps": args.accum_steps, "accumulation": args.accumulation,
            "tower": f"{args.shape} ({vit['image_size']} px)" if not args.dry_run else "tiny (dry run)",
            "params": n_params, "batch_per_gpu": args.batch_size,
            "steps": args.steps, "samples_per_second": samples_s,
            "samples_per_second_per_gpu": samples_s / ctx.world_size,
            "model_gflop_per_sample": flops_per_sample / 1e9, "achieved_tflops_per_gpu": achieved / 1e12,
            "peak_tflops_per_gpu": args.peak_tflops, "mfu": achieved / (args.peak_tflops * 1e12),
            "final_loss": final_loss, "wall_s": wall, "loss": args.loss,
            "peer": "plain PyTorch loop (torch.autocast, fused AdamW, grad clipping, no DeepSpeed)",
            "peer_samples_per_second": peer, "trainer_vs_peer": samples_s / peer if peer else None,
            "peak_gpu_mem_gib": peak_mem,
        }
        if ctx.is_main:
            print(f"train_vision GPU benchmark: {report['tower']} + adapter {args.llm_dim}->{args.embed_dim}, "
                  f"{precision}, ZeRO-{args.zero_stage}, {ctx.world_size} x {report['device']}")
            print(f"  samples/s {samples_s:.1f} ({report['samples_per_second_per_gpu']:.1f} per GPU), "
                  f"{report['model_gflop_per_sample']:.2f} GFLOP/sample (fwd+bwd), "
                  f"{report['achieved_tflops_per_gpu']:.1f} TFLOP/s per GPU = MFU {100 * report['mfu']:.1f}% "
                  f"of {args.peak_tflops:.0f} TFLOP/s bf16 peak")
            if peer:
                print(f"  peer ({report['peer']}): {peer:.1f} samples/s; trainer / peer = "
                      f"{report['trainer_vs_peer']:.2f}")
            print("RESULT " + json.dumps(report))
        return report
    finally:
        ctx.shutdown()


def largest_batch(kind: str, vit: dict, args: argparse.Namespace, device: torch.device) -> int:
    """The largest batch of :data:`AUTO_BATCHES` whose plain bf16 training step (forward, loss,
    backward) peaks below 85% of the GPU's memory; the trainer adds optimizer state (fp32 master +
    Adam moments, ~16 bytes per parameter) on top, which the margin covers for ViT-L."""
    if device.type != "cuda":
        return 4
    total = torch.cuda.get_device_properties(device).total_memory
    cfg = TrainVisionConfig(tower=kind, tower_config=vit, image_size=vit["image_size"],
                            gradient_checkpointing=args.gradient_checkpointing, embed_dim=args.embed_dim)
    model = LLM2CLIPModel.build(cfg.tower_spec(), llm_dim=args.llm_dim, embed_dim=args.embed_dim).to(device)
    loss_fn = create_loss("clip", gather=False)
    for batch in AUTO_BATCHES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            pixels = torch.randn(batch, 3, vit["image_size"], vit["image_size"], device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = loss_fn(**model(pixels, torch.randn(batch, args.llm_dim, device=device)))
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
            del pixels, out
            peak = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            continue
        if peak < 0.85 * total:
            print(f"  batch {batch}: a plain step peaks at {peak / 2**30:.1f} of {total / 2**30:.0f} GiB")
            del model
            torch.cuda.empty_cache()
            return batch
    raise SystemExit("not even the smallest batch fits")


def plain_loop(model: LLM2CLIPModel, cfg: TrainVisionConfig, args: argparse.Namespace, batch: dict,
               precision: str) -> float:
    """The peer: what a user writes by hand on one GPU. Same model, batch, loss, AdamW groups,
    clipping and clamp; fp32 weights under ``torch.autocast``. Median samples/s after warmup."""
    from llm2clip.train.optim import build_optimizer

    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay)
    optimizer, scheduler = build_optimizer(groups, lr=cfg.lr, total_steps=args.steps, warmup=0, schedule="cosine")
    params = [p for g in groups for p in g["params"]]
    loss_fn = create_loss(model.loss, gather=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device = batch["pixels"].device
    rates = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = loss_fn(**model(batch["pixels"], batch["text"]))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(len(batch["pixels"]) / (time.perf_counter() - tick))
    return statistics.median(rates[args.warmup:] or rates)


if __name__ == "__main__":
    main()
