"""What token merging (ToMe) costs in fidelity and gains in time, on a trained model.

    python benchmarks/tome.py [--checkpoint MODEL] [--prompts 16] [--steps 20]

For the first --prompts prompts of the quality benchmark's list, generates one image each
(seed = prompt index) exactly and with token merging at several (ratio, max_downsample)
settings, through `Pipeline.run` (GenerationRequest.token_merging_ratio), and prints seconds per
image, the speed-up and the PSNR (dB, images in [0, 1]) against the exact images. Default model:
the built-in one, whose attention sits at downsampling 2 and 4 only (so max_downsample 1 merges
nothing there). The SD 1.5-sized speed-up at 512x512 is in benchmarks/speed.py (sdtorch-bf16-tome).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from deepcache import first_prompts, psnr  # this folder's DeepCache benchmark: same prompts, same measure

import sdtorch
from sdtorch.generate.request import GenerationRequest

SETTINGS = [(0.3, 2), (0.5, 2), (0.5, 4)]


def run(pipe, prompts: list[str], steps: int, setting: tuple[float, int] | None) -> tuple[torch.Tensor, float]:
    ratio, max_down = setting or (0.0, 1)
    images, t0 = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(prompt, steps=steps, seed=i, token_merging_ratio=ratio,
                                    tome_options=(max_down, 2, 2))
        images.append(torch.from_numpy(np.asarray(pipe.run(request).images[0], dtype=np.float64) / 255))
    return torch.stack(images), (time.perf_counter() - t0) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the built-in model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    pipe = sdtorch.load(args.checkpoint)
    prompts = first_prompts(args.prompts)
    run(pipe, prompts[:1], args.steps, None)  # warm-up
    exact, base = run(pipe, prompts, args.steps, None)
    print(f"{pipe.config.name}, {len(prompts)} prompts, DPM++ 2M Karras {args.steps} steps, CFG 7.5")
    print(f"{'setting':<26}{'s/image':>9}{'speed-up':>10}{'PSNR dB':>9}{'worst dB':>10}")
    print(f"{'exact':<26}{base:>9.3f}{1.0:>10.2f}{'inf':>9}{'inf':>10}")
    for ratio, max_down in SETTINGS:
        images, seconds = run(pipe, prompts, args.steps, (ratio, max_down))
        per = [psnr(a, b) for a, b in zip(images, exact)]
        print(f"{f'ratio {ratio} max_downsample {max_down}':<26}{seconds:>9.3f}{base / seconds:>10.2f}"
              f"{psnr(images, exact):>9.1f}{min(per):>10.1f}")


if __name__ == "__main__":
    main()
