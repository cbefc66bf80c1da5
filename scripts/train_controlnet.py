"""Train a canny ControlNet for the built-in emoji model: the UNet's encoder copied (its new layers
zero), trained on the emoji dataset's edge maps without the held-out emoji (every 20th), written in
the original layout (`control_model.*`, fp16) like lllyasviel's files.

Usage: python scripts/train_controlnet.py RUN_DIR [--steps N] [--out FILE]   (re-running resumes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sdtorch
from sdtorch.training.data import emoji_training_set
from sdtorch.training.jobs import ControlNetJob
from sdtorch.training.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--module", default="canny")
    p.add_argument("--out", type=Path, default=None, help="default: RUN/control_emoji_MODULE.safetensors")
    args = p.parse_args()
    _, dataset = emoji_training_set(args.run)
    base = sdtorch.load()
    job = ControlNetJob(base.config, base.vae, base.clip, base.unet, module=args.module)
    job.cache_bf16 = True
    job.cache_latents(dataset)
    ema = train(job, dataset, TrainConfig(out=str(args.run / "controlnet"), steps=args.steps, batch_size=32, lr=1e-4,
                                          warmup=100, ema_decay=0.999, bf16=True, log_every=20, save_every=100))
    out = args.out or args.run / f"control_emoji_{args.module}.safetensors"
    print(job.export(ema, out, dtype=torch.float16))


if __name__ == "__main__":
    main()
