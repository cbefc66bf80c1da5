"""`--dtype int8`: PT2E quantization of the built-in model's UNet, calibrated on a few runs; the
image stays close to the float32 one, the infotext says so, and a request that changes the UNet
(a LoRA hook) or another shape runs eagerly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")

import sdtorch  # noqa: E402
from sdtorch.generate.quantized import quantize_pipeline  # noqa: E402
from sdtorch.generate.request import GenerationRequest  # noqa: E402


def psnr(a, b) -> float:
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    return 10 * math.log10(255**2 / ((x - y) ** 2).mean())


@pytest.mark.slow
def test_int8_unet_close_to_fp32_and_snapshot_guarded():
    exact = sdtorch.load()
    pipe = sdtorch.load()
    pipe._compiled = quantize_pipeline(pipe, 64, 64, batch_size=1, steps=3, prompts=("red apple", "blue heart"))
    request = GenerationRequest("smiling face", steps=12, seed=4)
    a, b = exact.run(request), pipe.run(request)
    assert 22 < psnr(a.images[0], b.images[0]) < 80  # close, and not the float32 image itself
    assert "Backend: int8 PT2E" in b.infotexts[0]
    args = torch.randn(2, 4, 16, 16), torch.full((2,), 400.0), torch.randn(2, 77, 128)
    hook = pipe.unet.out.register_forward_hook(lambda m, i, o: o * 0)
    try:
        assert pipe._compiled(*args).abs().max() == 0  # the hook ran: eager
    finally:
        hook.remove()
    wider = torch.randn(4, 4, 16, 16), torch.full((4,), 400.0), torch.randn(4, 77, 128)
    with torch.no_grad():
        assert torch.equal(pipe._compiled(*wider), pipe.unet(*wider))  # another shape: eager
