"""GPU caption-embedding throughput: packed inference vs the padded ``transformers`` forward.

A Llama-shaped backbone (random weights of the Llama-3-8B shape by default, built from its config
on the GPU; or ``--model DIR``, any encoder dir ``CaptionEncoder.from_pretrained`` loads) at bf16
embeds the same captions three ways, on the same token-budget batches (``plan_batches`` as
embed_captions plans them for a packed encoder, ``max_tokens`` 16384 = the stage's CUDA default):

- ``packed``: :class:`llm2clip.text.packed.PackedDecoder` (what embed_captions runs);
- ``padded`` (the peer): ``CaptionEncoder.forward``, the plain ``transformers`` forward with the
  bidirectional mask, on the same padded batches;
- ``padded, own batches``: the same forward on batches planned the way embed_captions plans them
  for an encoder that is not packed (at most 2% padding), its best case;

plus ``embed_texts``, the stage's whole per-shard function (tokenizing and normalising included).
Reported per caption set (the demo's short + dense captions, and ShareGPT4V-style paragraphs):
captions/s, real tokens/s, MFU = ``2 x non-embedding params x real tokens / time`` over the GPU's
dense bf16 peak, peak memory, the ratios packed / padded, and how far the packed vectors are from
the padded ones (cosine). Methods run alternately over slices of the batches (A B, B A, ...).

    python bench/gpu_embed.py                     # on a CUDA GPU (bench/gpu_all.sh runs it)
    python bench/gpu_embed.py --model models/caption_encoder
    python bench/gpu_embed.py --dry-run           # tiny Llama on CPU: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json); rope settings do not change the cost
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5}
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
H100_BF16_DENSE_TFLOPS = 989.4  # H100/H200 SXM, dense (no sparsity)
DEMO_TEMPLATE = "<|im_start|>user\n{instruction}{text}<|im_end|>"  # params.yaml caption_contrastive
TOKENIZER_DIRS = ("models/caption_encoder", ".cache/models")  # SmolLM2's tokenizer, where the demo put it


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny Llama on CPU, few captions (checks the script)")
    p.add_argument("--model", default="", help="an encoder dir instead of the random Llama-3-8B shape")
    p.add_argument("--tokenizer", default="", help="tokenizer dir for the random model (default: SmolLM2's "
                   f"from {' or '.join(TOKENIZER_DIRS)}, else a word-level tokenizer over the captions)")
    p.add_argument("--captions", type=int, default=4096, help="distinct captions per set")
    p.add_argument("--sets", default="demo,long", help="caption sets: demo (short + dense), long (paragraphs)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget per forward (the CUDA default)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512, help="tokens per caption (the paper profile's)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--rounds", type=int, default=4, help="alternating slices per comparison")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the GPU's dense peak for --precision (default: H100/H200 SXM bf16)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.captions, args.max_tokens, args.rounds = min(args.captions, 48), min(args.max_tokens, 512), 2
    return args


# ------------------------------------------------------------------------------- captions


def caption_sets(names: list[str], n: int, seed: int = 0) -> dict[str, list[str]]:
    """``n`` distinct captions per set, in arrival (shuffled) order.

    ``demo``: the short and dense captions of llm2clip's synthetic scenes (what the demo embeds);
    ``long``: their ShareGPT4V / DOCCI-style paragraphs (closer to the paper's dense recaptions).
    """
    try:
        from llm2clip.data.synthetic import CAPTION_STYLES, SHAPES, class_scene
    except ImportError:  # no PIL on this machine: the same kind of captions from a small grammar
        CAPTION_STYLES, SHAPES, class_scene = _plain_styles(), ("circle", "square", "star", "diamond"), _plain_scene

    styles = {"demo": ("short", "dense"), "long": ("long",)}
    rng = random.Random(seed)
    out = {}
    for name in names:
        texts: dict[str, None] = {}
        for _ in range(50 * n):
            scene = class_scene(rng.choice(SHAPES), rng)
            texts.update(dict.fromkeys(CAPTION_STYLES[s](scene) for s in styles[name]))
            if len(texts) >= n:
                break
        out[name] = list(texts)[:n]
        random.Random(seed).shuffle(out[name])
    return out


def _plain_scene(shape: str, rng: random.Random) -> dict:
    colours = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
    return {"a": shape, "b": rng.choice(("circle", "square", "star", "diamond", "hexagon")),
            "ca": rng.choice(colours), "cb": rng.choice(colours), "n": rng.randint(1, 3),
            "rel": rng.choice(("left of", "right of", "above", "below")), "word": rng.choice(("STOP", "GO", "CAT")),
            "bg": rng.choice(("gray", "white", "beige", "light blue"))}


def _plain_styles() -> dict:
    def short(s):
        return f"{s['n']} {s['ca']} {s['a']}{'s' if s['n'] > 1 else ''} {s['rel']} a {s['cb']} {s['b']}"

    def dense(s):
        return (f"a picture on a {s['bg']} background showing {short(s)}, with the word {s['word']} "
                "written in a band along the edge")

    def long(s):
        return " ".join([f"The image shows {short(s)} on a plain {s['bg']} background."] + [
            f"The {s['ca']} shapes are drawn with clean edges and sit {s['rel']} the {s['cb']} {s['b']}.",
            f"Along one edge, the word \"{s['word']}\" is printed in bold capital letters.",
            "Nothing else is in the picture; the composition is simple and evenly lit."])

    return {"short": short, "dense": dense, "long": long}


def word_tokenizer(texts: list[str]):
    """A word-level fast tokenizer over the words of ``texts`` (when no real tokenizer is at hand)."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace(".", " . ").replace(",", " , ").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def find_tokenizer(given: str, texts: list[str]):
    """``(tokenizer, prompt template, what it is)``."""
    from transformers import AutoTokenizer

    candidates = [Path(given)] if given else [
        REPO / d for d in TOKENIZER_DIRS[:1]] + sorted((REPO / TOKENIZER_DIRS[1]).glob("SmolLM2*"))
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(path)), DEMO_TEMPLATE, f"SmolLM2's tokenizer ({path})"
    if given:
        raise SystemExit(f"--tokenizer {given}: no tokenizer.json there")
    return word_tokenizer(texts), "{text}", "a word-level tokenizer over the captions (no SmolLM2 tokenizer here)"


# ------------------------------------------------------------------------------- model


def build_encoder(args, device: torch.device, dtype: torch.dtype, texts: list[str]):
    """``(CaptionEncoder, non-embedding params, what it is)``."""
    from transformers import LlamaConfig, LlamaModel

    from llm2clip.text.encoder import CaptionEncoder, EncoderSettings

    if args.model:
        encoder = CaptionEncoder.from_pretrained(args.model, dtype=dtype, device=device,
                                                 max_length=args.max_length).eval()
        what = f"{args.model} ({type(encoder.model).__name__})"
    else:
        shape = TINY if args.dry_run else LLAMA3_8B
        tokenizer, template, tok_what = find_tokenizer(args.tokenizer, texts)
        config = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))},
                             attn_implementation="sdpa", pad_token_id=tokenizer.pad_token_id)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise straight in the target dtype, on the device
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaModel(config)
        finally:
            torch.set_default_dtype(previous)
        settings = EncoderSettings(prompt_template=template, max_length=args.max_length, padding_side="left")
        encoder = CaptionEncoder(model.eval(), tokenizer, settings)
        what = (f"random weights, {'tiny' if args.dry_run else 'Llama-3-8B'} shape (hidden {shape['hidden_size']}, "
                f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']}/{shape['num_key_value_heads']} "
                f"heads); {tok_what}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    params = sum(p.numel() for p in encoder.model.parameters())
    non_embedding = params - encoder.model.get_input_embeddings().weight.numel()
    return encoder, non_embedding, what


# ------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_of(encoder, texts: list[str], args, max_padding: float) -> tuple[list[dict], list[list[int]]]:
    """Tokenized batches as embed_texts makes them: ``(batches, caption indices of each)``."""
    from llm2clip.text.embed import plan_batches

    enc = encoder.tokenize(texts)  # (n, L)
    lengths = enc["attention_mask"].sum(1)
    left = encoder.tokenizer.padding_side == "left"
    out, rows_of = [], []
    for idx in plan_batches(lengths.tolist(), args.max_tokens, args.max_batch_size, max_padding):
        rows = torch.tensor(idx)
        width = int(lengths[rows].max())
        cols = slice(-width, None) if left else slice(0, width)
        out.append({k: v[rows][:, cols] for k, v in enc.items()})
        rows_of.append(idx)
    return out, rows_of


def timed(methods: dict, batches: dict[str, list[dict]], rounds: int, device: torch.device) -> dict[str, float]:
    """Seconds per method over all its batches, run alternately slice by slice (A B, B A, ...)."""
    seconds = dict.fromkeys(methods, 0.0)
    for r in range(rounds):
        names = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in names:
            part = batches[name][r::rounds]
            sync(device)
            start = time.perf_counter()
            for batch in part:
                methods[name](batch)
            sync(device)
            seconds[name] += time.perf_counter() - start
    return seconds


@torch.inference_mode()
def bench_set(name: str, texts: list[str], encoder, non_embedding: int, args, device) -> dict:
    from llm2clip.text.embed import MAX_PADDING, EmbedStats, embed_texts

    pooling = encoder.settings.pooling
    same, rows = batches_of(encoder, texts, args, max_padding=1.0)  # planned for the packed path
    own, _ = batches_of(encoder, texts, args, max_padding=MAX_PADDING)  # planned for a padded forward
    real = sum(int(b["attention_mask"].sum()) for b in same)
    padded_same = sum(b["input_ids"].numel() for b in same)
    padded_own = sum(b["input_ids"].numel() for b in own)
    methods = {
        "packed": lambda b: encoder.packed.embed(b, pooling),
        "padded": lambda b: encoder(**b),
        "padded, own batches": lambda b: encoder(**b),
    }
    plan = {"packed": same, "padded": same, "padded, own batches": own}
    for method, batch_list in plan.items():  # warm-up: the biggest batch and a small one
        for b in (batch_list[0], batch_list[-1]):
            methods[method](b)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(methods, plan, args.rounds, device)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    # agreement of the two paths on the same batches (unit vectors, fp32)
    cos = []
    for b in same[:: max(1, len(same) // 8)]:
        a, p = F.normalize(encoder.packed.embed(b, pooling).float(), dim=-1), F.normalize(encoder(**b).float(), dim=-1)
        cos.append((a * p).sum(-1))
    cos = torch.cat(cos)
    embed_texts(encoder, texts[:64], max_tokens=args.max_tokens, max_batch_size=args.max_batch_size)  # warm-up
    stats = EmbedStats()
    sync(device)
    start = time.perf_counter()
    embed_texts(encoder, texts, max_tokens=args.max_tokens, max_batch_size=args.max_batch_size, stats=stats)
    sync(device)
    stage_s = time.perf_counter() - start
    peak = args.peak_tflops * 1e12
    rows_out = {}
    for method, secs in [*seconds.items(), ("embed_texts (stage function)", stage_s)]:
        rows_out[method] = {"seconds": secs, "captions_per_s": len(texts) / secs, "tokens_per_s": real / secs,
                            "mfu": 2 * non_embedding * real / secs / peak}
    return {"set": name, "captions": len(texts), "real_tokens": real, "tokens_per_caption": real / len(texts),
            "batches_same": len(same), "batches_own": len(own),
            "linear_tokens": {"packed": real, "padded": padded_same, "padded, own batches": padded_own},
            "methods": rows_out, "packed_vs_padded": seconds["padded"] / seconds["packed"],
            "packed_vs_padded_own": seconds["padded, own batches"] / seconds["packed"],
            "cosine_min": float(cos.min()), "cosine_median": float(cos.median()), "peak_mem_gib": memory,
            "batch_sizes": statistics.median(len(r) for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU, or --dry-run for the CPU check")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    sets = caption_sets(args.sets.split(","), args.captions)
    started = time.perf_counter()
    encoder, non_embedding, what = build_encoder(args, device, dtype, [t for s in sets.values() for t in s])
    if not encoder.enable_packed_inference():
        raise SystemExit(f"{what}: packed inference does not support this model (see the log)")
    build_s = time.perf_counter() - started
    name = torch.cuda.get_device_name(device) if cuda else "cpu (dry run)"
    print(f"gpu_embed: {name}, torch {torch.__version__}, {args.precision}; model: {what}; "
          f"{non_embedding / 1e9:.3f} B non-embedding params ({2 * non_embedding / 1e9:.2f} GFLOP per token); "
          f"built in {build_s:.0f} s; max_tokens {args.max_tokens}, peak {args.peak_tflops:.0f} TFLOP/s", flush=True)
    results = [bench_set(s, texts, encoder, non_embedding, args, device) for s, texts in sets.items()]
    print("\n| captions | method | captions/s | tokens/s | MFU | tokens through the linear layers |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        for method, m in r["methods"].items():
            linear = r["linear_tokens"].get(method, r["real_tokens"])
            print(f"| {r['set']} ({r['captions']}, {r['tokens_per_caption']:.0f} tok) | {method} | "
                  f"{m['captions_per_s']:,.1f} | {m['tokens_per_s']:,.0f} | {100 * m['mfu']:.1f}% | {linear:,} |")
    print("\n| captions | packed / padded (same batches) | packed / padded (its own batches) | "
          "cosine packed vs padded (min, median) | peak memory GiB |")
    print("|---|---:|---:|---|---:|")
    for r in results:
        print(f"| {r['set']} | **{r['packed_vs_padded']:.2f}x** | **{r['packed_vs_padded_own']:.2f}x** | "
              f"{r['cosine_min']:.4f}, {r['cosine_median']:.4f} | {r['peak_mem_gib']:.1f} |")
    report = {"device": name, "precision": args.precision, "model": what, "non_embedding_params": non_embedding,
              "max_tokens": args.max_tokens, "peak_tflops": args.peak_tflops, "sets": results}
    print("RESULT " + json.dumps(report))
    return report


if __name__ == "__main__":
    main()
