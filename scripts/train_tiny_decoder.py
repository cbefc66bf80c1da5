"""Train the built-in model's tiny decoder (TAESD's design with two upsamplings for its 4x VAE and
32 channels instead of 64: the built-in VAE is itself small, and at 64 the tiny one would be no faster):
distilled from the built-in VAE's decoder on the emoji dataset without its held-out emoji (every
20th), written in fp16 next to the built-in model. At the end it prints the held-out PSNR of the
tiny decoder's images against the VAE's and both decoders' times.

Usage: python scripts/train_tiny_decoder.py RUN_DIR [--steps N]   (re-running resumes)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import sdtorch
from sdtorch.generate.loading import BUILTIN_TINY, load_tiny_decoder
from sdtorch.training.data import emoji_training_set, held_out_items, square_crop_resize, to_tensor
from sdtorch.training.jobs import TinyDecoderJob
from sdtorch.training.train import TrainConfig, train


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float((a - b).pow(2).mean()))


def seconds(fn, repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--out", type=Path, default=BUILTIN_TINY)
    args = p.parse_args()
    data, dataset = emoji_training_set(args.run)
    base = sdtorch.load()
    job = TinyDecoderJob(base.config, base.vae, width=args.width, preview=list(range(0, 160, 20)))
    job.cache(torch.stack([dataset.get(i)["image"] for i in range(len(dataset))]))
    ema = train(job, dataset, TrainConfig(out=str(args.run / "tiny"), steps=args.steps, batch_size=32, lr=5e-4,
                                          warmup=50, ema_decay=0.999, log_every=20, save_every=250))
    print(job.export(ema, args.out))

    held = torch.stack([to_tensor(square_crop_resize(im, 64, 0.5)) for _, im, _ in held_out_items(data)])
    test = TinyDecoderJob(base.config, base.vae)
    test.cache(held)
    z, target = test.pairs
    base.tiny_decoder = load_tiny_decoder(args.out, base)
    with torch.no_grad():
        tiny = torch.cat([base.tiny_decoder.decode(z[i : i + 64]) for i in range(0, len(z), 64)])
        print(f"held-out emoji: {len(z)}; tiny decoder vs the VAE's decode: {psnr(tiny, target):.1f} dB")
        one = z[:1]
        t_vae = seconds(lambda: base.vae.decode(one / base.config.vae.scaling_factor))
        t_tiny = seconds(lambda: base.tiny_decoder.decode(one))
        print(f"decode of one 64x64 image: VAE {t_vae * 1e3:.2f} ms, tiny {t_tiny * 1e3:.2f} ms ({t_tiny / t_vae:.2f}x)")


if __name__ == "__main__":
    main()
