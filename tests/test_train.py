"""The training loop: loss goes down, resume is exact, DDP matches one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import sdtorch
from sdtorch.config import TINY
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.training.data import ImageCaptionDataset
from sdtorch.training.jobs import UNetJob, VAEJob
from sdtorch.training.train import Stream, TrainConfig, train

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """8 captioned 32x32 pictures: a coloured circle or square on white."""
    root = tmp_path_factory.mktemp("shapes")
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            im = Image.new("RGB", (32, 32), "white")
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 25, 25), fill=rgb)
            name = f"{colour}_{shape}.png"
            im.save(root / name)
            lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _losses(out: Path) -> list[float]:
    with open(out / "log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _vae_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), steps=40, batch_size=8, lr=2e-3, warmup=5, ema_decay=0.9, log_every=5, save_every=20)
    return TrainConfig(**(base | kw))


def test_vae_loss_goes_down_and_writes_a_run_folder(shapes, tmp_path):
    data = ImageCaptionDataset(shapes, 32)
    torch.manual_seed(0)
    job = VAEJob(TINY.vae, preview=torch.stack([data[i]["image"] for i in range(4)]))
    train(job, data, _vae_cfg(tmp_path, sample_every=20), progress=False)
    losses = _losses(tmp_path)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    assert (tmp_path / "last.pt").exists() and not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000020.png", "step_0000040.png"]


def _run_vae(out: Path, data, steps: int, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # a different init than the resumed state: it must be overwritten
    job = VAEJob(TINY.vae)
    ema = train(job, data, _vae_cfg(out, steps=steps, **kw), progress=False)
    return {**{"w." + k: v for k, v in job.vae.state_dict().items()},
            **{"ema." + k: v for k, v in ema["vae"].state_dict().items()}}


def test_resume_is_exact(shapes, tmp_path):
    data = ImageCaptionDataset(shapes, 32, flip=True)
    straight = _run_vae(tmp_path / "a", data, 10, save_every=5, grad_accum=2)
    _run_vae(tmp_path / "b", data, 5, save_every=5, grad_accum=2)  # "killed" after step 5 ...
    resumed = _run_vae(tmp_path / "b", data, 10, save_every=5, grad_accum=2)  # ... and started again
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_stream_visits_every_item_once_per_epoch():
    stream = Stream(10, seed=3)
    first = [stream.index(p) for p in range(10)]
    assert {e for e, _ in first} == {0} and sorted(i for _, i in first) == list(range(10))
    second = [stream.index(p)[1] for p in range(10, 20)]
    assert sorted(second) == list(range(10)) and second != [i for _, i in first]


def test_batch_must_split_evenly(shapes, tmp_path):
    with pytest.raises(ValueError, match="must divide"):
        train(VAEJob(TINY.vae), ImageCaptionDataset(shapes, 32), _vae_cfg(tmp_path, batch_size=6, grad_accum=4))


def test_ddp_two_processes_match_one(shapes, tmp_path):
    """`sdtorch train vae` under torchrun with 2 CPU processes (gloo) == 1 process, same global batch."""
    args = ["train", "vae", "--data", str(shapes), "--size", "32", "--steps", "4", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "2", "--save-every", "4", "--log-every", "1", "--flip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "sdtorch.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "sdtorch.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one" / "vae.safetensors"), load_file(tmp_path / "two" / "vae.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert _losses(tmp_path / "one")[0] == pytest.approx(_losses(tmp_path / "two")[0], rel=1e-4)


def test_unet_job_trains_and_exports_a_loadable_model(shapes, tmp_path):
    data = ImageCaptionDataset(shapes, 32)
    torch.manual_seed(0)
    vae, clip = AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip)
    cfg = replace(TINY, vae=replace(TINY.vae, scaling_factor=1.0), sample_size=32)
    job = UNetJob(cfg, vae, clip, preview_prompts=["a red circle"])
    ema = train(job, data, TrainConfig(out=str(tmp_path), steps=30, batch_size=8, lr=2e-3, warmup=3,
                                       log_every=1, save_every=30, sample_every=30), progress=False)
    losses = _losses(tmp_path)  # one row per step: random timesteps make single rows noisy
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.75 * first, losses
    path = job.export(ema, tmp_path / "model.safetensors")
    pipe = sdtorch.load(path)
    assert pipe.config == cfg and pipe.prediction_source == "metadata"
    assert pipe.generate("a red circle", steps=2, seed=0, progress=False)[0].size == (32, 32)
    assert (tmp_path / "samples" / "step_0000030.png").exists()


def test_the_three_jobs_chain_from_the_command_line(shapes, tmp_path):
    """dataset -> train vae -> train clip -> train unet -> generate with the exported model."""
    from sdtorch.cli import main

    common = ["--data", str(shapes), "--size", "32", "--steps", "2", "--batch-size", "4", "--save-every", "2"]
    assert main(["train", "vae", *common, "--out", str(tmp_path / "vae")]) == 0
    assert main(["train", "clip", *common, "--out", str(tmp_path / "clip"), "--patch-size", "8",
                 "--tower-width", "32", "--tower-layers", "1", "--embed-dim", "16"]) == 0
    assert main(["train", "unet", *common, "--out", str(tmp_path / "unet"), "--vae", str(tmp_path / "vae" / "vae.safetensors"),
                 "--clip", str(tmp_path / "clip" / "clip.safetensors"), "--prediction", "v"]) == 0
    model = tmp_path / "unet" / "model.safetensors"
    pipe = sdtorch.load(model)
    assert pipe.config.prediction == "v" and pipe.config.vae.scaling_factor != TINY.vae.scaling_factor
    assert main(["generate", "a red circle", "-c", str(model), "--steps", "2", "--width", "32", "--height", "32",
                 "--out", str(tmp_path / "images")]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


def test_cached_latents_give_the_loss_of_encoding_every_step(shapes):
    """UNetJob.cache_latents (fixed datasets): the same z0 and loss as running the encoder."""
    from sdtorch.training.train import collate

    data = ImageCaptionDataset(shapes, 32)
    torch.manual_seed(0)
    vae, clip = AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip)
    job = UNetJob(replace(TINY, sample_size=32), vae, clip)
    batch = collate([data[i] for i in (5, 0, 3)]) | {"models": job.modules}
    seeds = torch.tensor([11, 12, 13])
    plain = job.loss(batch, seeds)[0]
    job.cache_latents(data, chunk=3)
    assert job.latent_cache[0].shape == (len(data), 4, 16, 16)
    cached = job.loss(batch, seeds)[0]
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    assert job.loss(batch, torch.tensor([11, 12, 14]))[0].item() != pytest.approx(plain.item(), rel=1e-5)
