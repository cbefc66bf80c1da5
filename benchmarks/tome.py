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

import time

import numpy as np
import torch
from deepcache import compare  # this folder's DeepCache benchmark: same prompts, same measure, same table

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


if __name__ == "__main__":
    compare(__doc__, run, SETTINGS, lambda s: f"ratio {s[0]} max_downsample {s[1]}")
