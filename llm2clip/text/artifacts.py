"""What the caption_contrastive stage leaves behind: the encoder dir, its curve and manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2clip.contracts import remove_manifest, write_manifest
from llm2clip.io import atomic_write_json, sha256_file
from llm2clip.text.cra import CRA_PROTOCOL
from llm2clip.text.data import ImageCaptions
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder


def save_loss_curve(losses: list[float], path: Path, resumed_from: int = 0) -> None:
    """A small PNG of the loss per step (a dotted line marks where a run resumed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    if resumed_from:
        ax.axvline(resumed_from, ls=":", c="grey", label=f"resumed at {resumed_from}")
        ax.legend()
    ax.set(xlabel="step", ylabel="caption-contrastive loss", title="caption_contrastive")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def probe_embeddings(encoder: CaptionEncoder, images: list[ImageCaptions], fields: tuple[str, ...],
                     count: int = 4) -> dict[str, Any]:
    """A fingerprint of the encoder: a few val captions and their normalised vectors.

    Whoever loads the saved encoder can re-embed ``texts`` and compare (``atol`` ~1e-5 on the
    same hardware): it proves the saved model, tokenizer and settings embed as trained.
    """
    texts = [c for image in images[:count] for _, c in image.flat(fields)[:1]]
    vectors = encoder.encode(texts, normalize=True)
    return {"texts": texts, "embeddings": [[round(float(x), 7) for x in row] for row in vectors]}


def write_encoder_dir(out: Path, encoder: CaptionEncoder, losses: list[float], resumed_from: int,
                      metrics: dict[str, float], manifest: dict[str, Any]) -> None:
    """Model + tokenizer + settings, ``training_curve.png``, ``metrics.json``, then the manifest.

    ``manifest`` gets ``settings``, ``settings_file``, ``embedding_dim``, ``cra_protocol`` and the
    sha256 of every file added; it is written last (:func:`llm2clip.contracts.write_manifest`,
    which stamps ``stage`` and ``format_version``), so a dir without it is unfinished.
    """
    remove_manifest(out)
    encoder.save_pretrained(out)
    save_loss_curve(losses, out / "training_curve.png", resumed_from)
    atomic_write_json(out / "metrics.json", metrics)
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    write_manifest("caption_contrastive", out, {
        **manifest, "settings_file": SETTINGS_FILE, "settings": encoder.settings.to_dict(),
        "embedding_dim": encoder.dim, "cra_protocol": CRA_PROTOCOL, "files": files,
    })
