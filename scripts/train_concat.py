"""Train a small image-conditioned model on the built-in emoji data (`sdtorch.training.concat_jobs`):
instruct-pix2pix, depth-to-image or the x4 upscaler, each the built-in model's UNet widened for its
extra inputs, fine-tuned on the emoji without the held-out ones (every 20th), written UNet-only in
fp16 as RUN_DIR/emoji_<kind>.safetensors (it shares the built-in model's VAE and text encoder;
copy it beside the built-in model or into sdtorch/data to load it by name).

Usage: python scripts/train_concat.py {instruct-pix2pix,depth,x4-upscaler} RUN_DIR [--steps N]
(re-running resumes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sdtorch
from sdtorch.training.concat_jobs import JOBS
from sdtorch.training.data import emoji_training_set
from sdtorch.training.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(JOBS))
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    _, dataset = emoji_training_set(args.run)
    base = sdtorch.load()
    kind = JOBS[args.kind]
    job = kind(kind.config(base.config, f"emoji-{args.kind}"), base.vae, base.clip, unet=base.unet,
               caption_dropout=0.1)
    if args.kind != "instruct-pix2pix":  # its targets are edited images, encoded per step
        job.cache_bf16 = True
        job.cache_latents(dataset)
    out = args.run / args.kind
    ema = train(job, dataset, TrainConfig(out=str(out), steps=args.steps, batch_size=32, lr=1e-4, warmup=100,
                                          ema_decay=0.999, bf16=True, log_every=20, save_every=100))
    print(job.export(ema, args.run / f"emoji_{args.kind.replace('-', '_')}.safetensors"))


if __name__ == "__main__":
    main()
