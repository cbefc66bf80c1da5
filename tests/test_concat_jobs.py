"""The training jobs for image-conditioned models (`sdtorch.training.concat_jobs`) on a tiny model:
exact edits, the stand-in depth, widened UNets that start as their base, and a few training steps
whose UNet-only file loads with its base and runs its kind of request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdtorch
from sdtorch.families import describe
from sdtorch.generate.request import GenerationRequest
from sdtorch.models.condition import Condition
from sdtorch.training.concat_jobs import EDITS, JOBS, apply_edit, silhouette_depth
from sdtorch.training.jobs import widen_input


def disc(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(220, 40, 40))
    return im


def tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def test_edits_are_the_pixel_operations_they_name():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(apply_edit(x, ["flip it"]), x.flip(-1))
    assert torch.equal(apply_edit(x, ["turn it upside down"]), x.flip(-2))
    assert torch.equal(apply_edit(x, ["swap red and blue"])[0], x[0, [2, 1, 0]])
    assert torch.equal(apply_edit(x, ["make it a negative"]), -x)
    grey = apply_edit(x, ["make it black and white"])[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.allclose(grey[0], 0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2])
    assert len(EDITS) == 5


def test_silhouette_depth_is_a_dome_on_the_shape():
    d = silhouette_depth(torch.cat([tensor(disc()), torch.ones(1, 3, 64, 64)]))
    assert d.shape == (2, 64, 64) and d.min() >= 0 and d.max() <= 1
    assert d[1].abs().max() == 0  # a white picture: all background
    assert d[0, 0, 0] == 0 and d[0, 32, 32] == d[0].max() > 0.95  # far outside, nearest in the middle
    assert 0.5 <= d[0, 32, 14] < d[0, 32, 24] < d[0, 32, 32]  # rising towards the middle


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_job_starts_as_its_base_trains_and_its_file_runs(kind, tiny_file, tmp_path):
    from sdtorch.formats import checkpoint
    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.train import TrainConfig, train

    base = sdtorch.load(tiny_file)
    job_type = JOBS[kind]
    cfg = job_type.config(base.config, f"tiny-{kind}")
    wide = widen_input(base.unet, cfg.unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32)
    extra = torch.randn(2, job_type.extra, 8, 8)
    labels = torch.tensor([20, 300]) if cfg.unet.num_classes else None
    with torch.no_grad():
        assert torch.equal(wide(torch.cat([x, extra], 1), t, ctx, labels), base.unet(x, t, ctx))

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        disc().rotate(30 * i, fillcolor="white").save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "text": "disc {i}"}}\n' for i in range(4)))
    job = job_type(cfg, base.vae, base.clip, unet=base.unet, base=tiny_file.name)
    batch = {"image": torch.cat([tensor(disc())] * 2), "text": ["disc", "disc"], "models": job.modules}
    loss, _ = job.loss(batch, torch.tensor([1, 2]))
    assert loss.isfinite() and loss > 0
    ema = train(job, ImageCaptionDataset(data, 64), TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=2,
                                                                 warmup=1, save_every=0, log_every=1), progress=False)
    (tmp_path / tiny_file.name).write_bytes(tiny_file.read_bytes())  # the base beside it
    path = job.export(ema, tmp_path / f"tiny_{kind}.safetensors")
    assert checkpoint.read(path).config.unet == cfg.unet
    pipe = sdtorch.load(path)
    assert describe(pipe.config).endswith(kind)
    common = dict(steps=2, sampler="euler", scheduler="automatic", seed=1)
    if kind == "x4-upscaler":
        request = GenerationRequest("disc", init_image=disc(8), **common)
    elif kind == "depth":
        request = GenerationRequest("disc", init_image=disc(), depth_map=silhouette_depth(tensor(disc())), **common)
    else:
        request = GenerationRequest("flip it", init_image=disc(), **common)
    size = 8 * pipe.vae.downscale if kind == "x4-upscaler" else 64  # the upscaler's VAE makes its input larger
    assert pipe.run(request).images[0].size == (size, size)


def test_upscale_job_gives_the_noise_level_as_the_class_label(tiny_file, monkeypatch):
    base = sdtorch.load(tiny_file)
    job_type = JOBS["x4-upscaler"]
    job = job_type(job_type.config(base.config, "tiny-x4"), base.vae, base.clip, unet=base.unet)
    seen = {}

    def spy(unet, z0, context, seeds, concat=None):
        seen.update(context=context, concat=concat)
        return torch.zeros(())

    monkeypatch.setattr(job, "denoising_loss", spy)
    job.loss({"image": torch.cat([tensor(disc())] * 3), "text": ["disc"] * 3, "models": job.modules},
             torch.tensor([1, 2, 3]))
    assert isinstance(seen["context"], Condition) and seen["context"].vector.dtype == torch.long
    assert ((seen["context"].vector >= 0) & (seen["context"].vector <= 350)).all()
    f = base.vae.downscale
    assert seen["concat"].shape == (3, 3, 64 // f, 64 // f)
