"""What DeepCache costs in fidelity and gains in time, on a trained model.

    python benchmarks/deepcache.py [--checkpoint MODEL] [--prompts 16] [--steps 20]

For the first --prompts prompts of the quality benchmark's list, generates one image each
(seed = prompt index) with the exact UNet and with DeepCache at several (interval, branch)
settings, and prints the seconds per image, the speed-up, and the PSNR (dB, images in [0, 1])
of each setting's images against the exact ones. Default model: the built-in one (trained; a
random-weight model says little about fidelity). The SD 1.5-sized speed-up at 512x512 is in
benchmarks/speed.py (config sdtorch-bf16-deepcache).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import sdtorch
from sdtorch.generate.pipeline import GenerationParams

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(2, 0), (3, 0), (3, 1), (4, 1)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).square().mean())
    return 10 * math.log10(1 / mse) if mse else math.inf


def first_prompts(n: int) -> list[str]:
    """The first n prompts of the quality benchmark's list."""
    lines = (ROOT / "benchmarks" / "quality_prompts.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip()][:n]


def run(pipe, prompts: list[str], steps: int, setting: tuple[int, int] | None) -> tuple[torch.Tensor, float]:
    pipe.deep_cache = setting
    images, t0 = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        params = GenerationParams(prompt, steps=steps, seed=i, width=None, height=None)
        params.width = params.height = pipe.config.sample_size
        images.append(pipe.decode(pipe.generate_latents(params, progress=False)))
    pipe.deep_cache = None
    return torch.cat(images), (time.perf_counter() - t0) / len(prompts)


def compare(doc: str, run, settings: list[tuple], label) -> None:
    """The command line and table this benchmark and benchmarks/tome.py share: a warm-up, the exact
    images, then each setting's seconds per image, speed-up and PSNR against them.
    run(pipe, prompts, steps, setting or None) -> (images, seconds per image); label(setting) -> row name."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the built-in model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    pipe = sdtorch.load(args.checkpoint)
    prompts = first_prompts(args.prompts)
    run(pipe, prompts[:1], args.steps, None)  # warm-up
    exact, base = run(pipe, prompts, args.steps, None)
    print(f"{pipe.config.name}, {pipe.config.sample_size}x{pipe.config.sample_size}, {len(prompts)} prompts, "
          f"DPM++ 2M Karras {args.steps} steps, CFG 7.5, torch {torch.__version__}, {torch.get_num_threads()} threads")
    width = max(22, *(len(label(setting)) + 4 for setting in settings))
    print(f"{'setting':<{width}}{'s/image':>9}{'speed-up':>10}{'PSNR dB':>9}{'worst dB':>10}")
    print(f"{'exact':<{width}}{base:>9.3f}{1.0:>10.2f}{'inf':>9}{'inf':>10}")
    for setting in settings:
        images, seconds = run(pipe, prompts, args.steps, setting)
        per = [psnr(a, b) for a, b in zip(images, exact)]
        print(f"{label(setting):<{width}}{seconds:>9.3f}{base / seconds:>10.2f}{psnr(images, exact):>9.1f}{min(per):>10.1f}")


if __name__ == "__main__":
    compare(__doc__, run, SETTINGS, lambda s: f"interval {s[0]} branch {s[1]}")
