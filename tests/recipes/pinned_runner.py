"""Tiny seeded runs of caption_contrastive (+ MNTP) and train_vision for the pinned-loss tests.

Run as a plain process (one rank) or under ``torchrun --nproc-per-node 2`` (two gloo ranks):
``python pinned_runner.py <root> <out>``. ``<root>`` holds what the test prepared (``model/``,
``text_data/``, ``data/``, ``emb/``); every run writes its stage output under
``<out>/<stage>-zero<N>/``. Only the stages' public entry points and params are used, so the
runs stay the same whatever the trainers look like inside.
"""

import sys

from llm2clip.config import load_params
from llm2clip.stages import caption_contrastive, train_vision
from llm2clip.train.distributed import init_distributed

TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 8}


def overrides(root: str, zero: int) -> list[str]:
    cc = {"model": f"{root}/model", "prompt_template": "'[INST] {instruction}{text} [/INST]'",
          "batch_size": 4, "max_steps": 5, "warmup_steps": 2, "lr": 0.003, "checkpoint_every": 0,
          "log_every": 1, "mntp_steps": 5, "mntp_batch_size": 4, "mntp_lr": 0.001, "zero_stage": zero,
          "lora_layers": 0, "precision": "fp32"}
    tv = {"tower": "vit_scratch", "tower_config": str(TINY_VIT).replace("'", '"'), "image_size": 32,
          "embed_dim": 16, "adapter_blocks": 2, "batch_size": 4, "max_steps": 5, "lr": 0.002,
          "warmup_steps": 2, "logit_scale_init": 4.7, "zero_stage": zero, "workers": 0, "shuffle_buffer": 16,
          "checkpoint_every": 0, "log_every": 1, "val_batch_size": 8, "precision": "fp32"}
    return (["common.tracking=false"] + [f"caption_contrastive.{k}={v}" for k, v in cc.items()]
            + [f"train_vision.{k}={v}" for k, v in tv.items()])


def main(root: str, out: str) -> None:
    ctx = init_distributed()  # one process group for every run below (each run() reuses it)
    try:
        for zero in (0, 2):
            p = load_params(None, overrides(root, zero))
            caption_contrastive.run(p.caption_contrastive, p.common, data=f"{root}/text_data",
                                    caption_encoder=f"{out}/caption_contrastive-zero{zero}")
            train_vision.run(p.train_vision, p.common, data=f"{root}/data", embeddings=f"{root}/emb",
                             vision_model=f"{out}/train_vision-zero{zero}")
    finally:
        ctx.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
