"""Semantic synthesis: colour layouts, the layout training job, UNet-only files with a base, and
layout models in requests and on the command line (tiny models; the built-in layout model's
quality is measured by benchmarks/layout.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdtorch
from sdtorch.conditioning.layout import colour_layout, layout_iou
from sdtorch.families import describe
from sdtorch.formats import checkpoint
from sdtorch.generate.request import GenerationRequest, RequestError
from sdtorch.training.jobs import LayoutJob, widen_input


def blobs(size: int = 64, shift: int = 0) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((8 + shift, 8, 40 + shift, 40), fill=(220, 40, 40))
    d.rectangle((30, 36, 60, 60), fill=(40, 60, 220))
    return im


def tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def test_colour_layout_finds_the_regions():
    layout = colour_layout(tensor(blobs()), (16, 16))
    assert layout.shape == (1, 3, 16, 16)
    colours = layout[0].flatten(1).T.unique(dim=0)
    assert len(colours) <= 4
    assert torch.equal(layout, colour_layout(tensor(blobs()), (16, 16)))  # deterministic
    corner, centre = layout[0, :, 0, 0], layout[0, :, 6, 6]  # background white, the red disc
    assert corner.min() > 0.9 and centre[0] > 0.5 > centre[1]
    assert layout_iou(layout[0], layout[0]) == 1.0
    moved = colour_layout(tensor(blobs(shift=16)), (16, 16))[0]
    assert 0.3 < layout_iou(layout[0], moved) < 0.95


@pytest.fixture(scope="module")
def layout_model(tiny_file, tmp_path_factory):
    """A tiny layout model: the tiny UNet widened for a layout, trained a few steps by LayoutJob,
    written UNet-only beside its base file."""
    from sdtorch.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("layout")
    base = sdtorch.load(tiny_file)
    data = root / "data"
    data.mkdir()
    lines = []
    for i in range(8):
        blobs(shift=4 * i).save(data / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "blobs {i}"}}\n')
    (data / "metadata.jsonl").write_text("".join(lines))
    from sdtorch.training.data import ImageCaptionDataset

    cfg = replace(base.config, name="tiny-layout", unet=replace(base.config.unet, in_channels=7))
    job = LayoutJob(cfg, base.vae, base.clip, unet=base.unet)
    ema = train(job, ImageCaptionDataset(data, 64), TrainConfig(out=str(root / "run"), steps=3, batch_size=4,
                                                                 warmup=1, save_every=0, log_every=1), progress=False)
    path = checkpoint.save_unet(root / "tiny_layout.safetensors", ema["unet"], cfg, base=tiny_file.name)
    (root / tiny_file.name).write_bytes(tiny_file.read_bytes())  # the base beside it
    return base, path


def test_widened_unet_computes_what_the_base_did(tiny_file):
    base = sdtorch.load(tiny_file)
    wide = widen_input(base.unet, replace(base.config.unet, in_channels=7))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(wide(torch.cat([x, torch.randn(2, 3, 8, 8)], 1), t, ctx), base.unet(x, t, ctx))


def test_layout_model_file_loads_with_its_base_and_follows_requests(layout_model, tmp_path):
    base, path = layout_model
    pipe = sdtorch.load(path)
    assert describe(pipe.config).endswith("layout") and pipe.config.unet.in_channels == 7
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)  # the base's VAE
    common = dict(steps=3, sampler="euler", scheduler="automatic", seed=1, width=64, height=64)
    a = pipe.run(GenerationRequest("blobs", layout=blobs(), **common))
    b = pipe.run(GenerationRequest("blobs", layout=blobs(shift=16), **common))
    assert "Layout hash: " in a.infotexts[0] and a.infotexts[0] != b.infotexts[0]
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max() > 0
    with pytest.raises(RequestError, match="give a layout"):
        pipe.run(GenerationRequest("blobs", **common))
    with pytest.raises(RequestError, match="layout models"):
        base.run(GenerationRequest("blobs", layout=blobs(), **common))
    with pytest.raises(RequestError, match="layout must be"):
        GenerationRequest("blobs", layout="map.png").validate()
    lonely = tmp_path / "alone.safetensors"
    lonely.write_bytes(path.read_bytes())  # without its base beside it (and not in the package)
    with pytest.raises(checkpoint.CheckpointError, match="neither beside it"):
        sdtorch.load(lonely)


def test_command_line_layout(layout_model, tmp_path):
    from sdtorch.cli import main

    _, path = layout_model
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((10, 10, 50, 50), fill=(30, 160, 40, 255))
    rgba.save(tmp_path / "map.png")
    assert main(["generate", "a green ball", "-c", str(path), "--layout", str(tmp_path / "map.png"), "--steps", "2",
                 "--seed", "3", "--sampler", "euler", "--out", str(tmp_path / "out")]) == 0
    out, = (tmp_path / "out").glob("*.png")
    assert "Layout hash: " in Image.open(out).info["parameters"]


def test_the_built_in_layout_model_follows_a_drawn_layout(tmp_path):
    """The shipped model (UNet only, on the built-in model's VAE and text encoder) paints a red disc
    where the layout has one and a blue one where it has that, for a prompt that names no colour
    ("circle" would: the red circle emoji wins over a blue layout); the command line finds it by default."""
    from sdtorch.cli import main
    from sdtorch.generate.loading import BUILTIN_LAYOUT

    pipe = sdtorch.load(BUILTIN_LAYOUT)
    assert describe(pipe.config) == "custom (emoji-layout) layout" and BUILTIN_LAYOUT.stat().st_size < 40e6
    colours = {}
    for name, fill in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        layout = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(layout).ellipse((12, 12, 52, 52), fill=fill)
        out = pipe.run(GenerationRequest("disc", layout=layout, steps=10, seed=0, width=64, height=64)).images[0]
        px = np.asarray(out, np.float32)
        colours[name] = (px[24:40, 24:40].mean(axis=(0, 1)), px[:6, :6].mean())
    (red, red_corner), (blue, blue_corner) = colours["red"], colours["blue"]
    assert red[0] > red[2] + 60 and blue[2] > blue[0] + 60  # the disc's colour follows the layout
    assert red_corner > 200 and blue_corner > 200  # the white background stays white
    layout_file = tmp_path / "map.png"
    Image.new("RGB", (64, 64), (40, 160, 40)).save(layout_file)
    assert main(["generate", "a leaf", "--layout", str(layout_file), "--steps", "4", "--seed", "1",
                 "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
