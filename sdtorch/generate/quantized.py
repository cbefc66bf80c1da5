"""`--dtype int8`: a loaded float32 pipeline's UNet quantized by PT2E (`sdtorch.adapters.int8`),
calibrated on the UNet inputs of a few guided runs at the size it will serve."""

from __future__ import annotations

import torch

from sdtorch.adapters.int8 import CALIBRATION, Int8UNet, Recorder, quantize
from sdtorch.generate.params import GenerationParams


def quantize_pipeline(pipe, width: int, height: int, batch_size: int = 1, steps: int = 4,
                      prompts: tuple[str, ...] = CALIBRATION) -> Int8UNet:
    """Calibrate on `prompts` (guided Euler runs at this size and batch) and quantize pipe's UNet."""
    if pipe.dtype != torch.float32:
        raise ValueError(f"int8 quantizes a float32 UNet, this one is {pipe.dtype}")
    recorder, saved = Recorder(pipe.unet), pipe._compiled
    pipe._compiled = recorder
    try:
        for i, prompt in enumerate(prompts):
            pipe.generate_latents(GenerationParams(prompt, steps=steps, sampler="euler", seed=1000 + i, width=width,
                                                   height=height, batch_size=batch_size), progress=False)
    finally:
        pipe._compiled = saved
    shapes = tuple(tuple(a.shape) for a in recorder.calls[0])
    return Int8UNet(pipe.unet, quantize(pipe.unet, recorder.calls), shapes)
