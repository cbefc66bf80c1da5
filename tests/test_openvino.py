"""`--compile openvino`: the UNet run by OpenVINO's CPU runtime gives the eager image (f32), keeps
its converted graph on disk, and never runs a stale snapshot (LoRA hooks, seamless tiling, weights
changed in place run eagerly or reconvert)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import sdtorch  # noqa: E402
from sdtorch.adapters.fast import snapshot_holds  # noqa: E402
from sdtorch.adapters.openvino import OpenVINOModule  # noqa: E402
from sdtorch.generate.request import GenerationRequest  # noqa: E402


def psnr_images(a, b) -> float:
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


REQUEST = GenerationRequest("red apple", steps=6, seed=11, batch_size=2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    eager = sdtorch.load()
    ov = sdtorch.load()
    ov.compile("openvino", cache_dir=tmp_path_factory.mktemp("ov"))
    return eager, ov


def test_same_image_as_eager_and_named_in_the_infotext(pipes):
    eager, ov = pipes
    a, b = eager.run(REQUEST), ov.run(REQUEST)
    assert len(ov._compiled.graphs) == 1 and len(ov._vae_decode.graphs) == 1  # the graphs ran
    for x, y in zip(a.images, b.images):
        assert psnr_images(x, y) > 45
    assert "Backend: OpenVINO" in b.infotexts[0] and "Backend" not in a.infotexts[0]


def test_graph_kept_on_disk_and_read_back(pipes, caplog):
    _, ov = pipes
    ov.run(REQUEST)
    (xml,) = ov._compiled.cache_dir.glob("unet-*.xml")
    fresh = OpenVINOModule(ov.unet, cache_dir=ov._compiled.cache_dir, key=ov._compiled.key)
    x, t, ctx = torch.randn(4, 4, 16, 16), torch.full((4,), 500.0), torch.randn(4, 77, ov.config.clip.width)
    with caplog.at_level(logging.INFO, logger="sdtorch.adapters.openvino"):
        out = fresh(x, t, ctx)
    assert f"read from {xml}" in caplog.text
    with torch.no_grad():
        ref = ov.unet(x, t, ctx)
    assert (out - ref).norm() / ref.norm() < 1e-4


def test_lora_and_tiling_run_eagerly(pipes, tmp_path):
    eager, ov = pipes
    tiled = GenerationRequest("red apple", steps=4, seed=2, tiling=True)
    assert psnr_images(eager.run(tiled).images[0], ov.run(tiled).images[0]) > 45
    from sdtorch.adapters.seamless import seamless

    with seamless(ov.unet, ov.vae):
        assert "circular" in snapshot_holds(ov.unet)
    hook = ov.unet.out.register_forward_hook(lambda m, i, o: o * 0)
    try:
        assert "forward hooks" in snapshot_holds(ov.unet)
        zeroed = ov._compiled(torch.randn(2, 4, 16, 16), torch.full((2,), 10.0), torch.randn(2, 77, 128))
        assert zeroed.abs().max() == 0  # the hook ran: eager
    finally:
        hook.remove()
    assert snapshot_holds(ov.unet) is None


def test_weights_changed_in_place_reconvert(tmp_path):
    pipe = sdtorch.load()
    pipe.compile("openvino")  # no disk cache
    module = pipe._compiled
    args = torch.randn(2, 4, 16, 16), torch.full((2,), 300.0), torch.randn(2, 77, 128)
    before = module(*args)
    with torch.no_grad():
        pipe.unet.out[-1].bias.add_(1.0)  # as a merged LoRA would change a weight
        expected = pipe.unet(*args)
    after = module(*args)
    assert (after - before).abs().mean() > 0.5
    assert (after - expected).norm() / expected.norm() < 1e-4
