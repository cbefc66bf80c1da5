"""Train the built-in layout model (semantic synthesis): the built-in emoji model's UNet with 3 more
input channels for a colour layout (`sdtorch.conditioning.layout`), fine-tuned on the emoji dataset
without its held-out emoji (every 20th), written UNet-only in fp16 (it shares the built-in model's
VAE and text encoder).

Usage: python scripts/train_layout.py RUN_DIR [--steps N]   (re-running resumes)
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

import sdtorch
from sdtorch.formats import checkpoint
from sdtorch.training.data import emoji_training_set
from sdtorch.training.jobs import LayoutJob
from sdtorch.training.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", type=Path, default=Path(sdtorch.__file__).parent / "data" / "emoji_layout.safetensors")
    args = p.parse_args()
    _, dataset = emoji_training_set(args.run)  # every 20th emoji held out
    base = sdtorch.load()
    cfg = replace(base.config, name="emoji-layout", unet=replace(base.config.unet, in_channels=7))
    job = LayoutJob(cfg, base.vae, base.clip, unet=base.unet, caption_dropout=0.1)
    job.cache_bf16 = True
    job.cache_latents(dataset)
    ema = train(job, dataset, TrainConfig(out=str(args.run / "unet"), steps=args.steps, batch_size=32, lr=1e-4,
                                          warmup=100, ema_decay=0.999, bf16=True, log_every=20, save_every=100))
    print(checkpoint.save_unet(args.out, ema["unet"], cfg, base="emoji.safetensors", dtype=torch.float16))


if __name__ == "__main__":
    main()
