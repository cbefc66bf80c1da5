"""DreamBooth: class images made once and reused, the prior-preservation loss, full and LoRA
exports, exact resume. A random-weight tiny model at 32x32 pixels stands in for a real one."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sdtorch
from sdtorch.config import TINY
from sdtorch.formats import checkpoint
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.training.data import ImageCaptionDataset
from sdtorch.training.dreambooth import DreamBoothDataset, DreamBoothJob, class_images
from sdtorch.training.jobs import UNetJob
from sdtorch.training.train import Stream, TrainConfig, micro_batch, train

CFG = replace(TINY, sample_size=32)
INSTANCE, CLASS = "a sks shape", "a shape"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A random-weight tiny model as sdtorch writes one (config in the metadata)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dreambooth_model") / "tiny.safetensors"
    return checkpoint.save(path, UNetModel(CFG.unet), AutoencoderKL(CFG.vae), ClipTextModel(CFG.clip), CFG)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    """The subject: 3 uncaptioned pictures of a magenta triangle, placed a little differently."""
    root = tmp_path_factory.mktemp("instances")
    for i, dx in enumerate((0, 3, 6)):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).polygon([(4 + dx, 26), (14 + dx, 5), (24 + dx, 26)], fill=(230, 20, 200))
        im.save(root / f"subject_{i}.png")
    return root


@pytest.fixture(scope="module")
def class_dir(model_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    class_images(sdtorch.load(model_file), root, CLASS, 4, steps=2, progress=False)
    return root


def dreambooth_data(instance_dir: Path, class_dir: Path, *, flip: bool = False) -> DreamBoothDataset:
    instances = ImageCaptionDataset(instance_dir, 32, flip=flip, caption=INSTANCE)
    return DreamBoothDataset(instances, ImageCaptionDataset(class_dir, 32, flip=flip, caption=CLASS))


def full_job(model_file: Path, *, prior_loss_weight: float = 1.0, text_encoder: bool = False) -> DreamBoothJob:
    pipe = sdtorch.load(model_file)
    inner = UNetJob(pipe.config, pipe.vae, pipe.clip, unet=pipe.unet, caption_dropout=0.0,
                    train_text_encoder=text_encoder)
    return DreamBoothJob(inner, prior_loss_weight=prior_loss_weight)


def losses(out: Path, column: str = "loss") -> list[float]:
    with open(out / "log.csv", newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f)]


def test_class_images_are_generated_once_and_reused(model_file, tmp_path):
    pipe = sdtorch.load(model_file)
    folder = tmp_path / "class"
    assert class_images(pipe, folder, CLASS, 2, steps=2, progress=False) == 2
    first = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert sorted(first) == ["class_00000.png", "class_00001.png"]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": f"class_0000{i}.png", "text": CLASS, "seed": i} for i in range(2)]

    assert class_images(pipe, folder, CLASS, 2, steps=2, progress=False) == 0  # a rerun makes none
    assert class_images(pipe, folder, CLASS, 3, steps=2, progress=False) == 1  # more: only the missing one
    assert all((folder / name).read_bytes() == data for name, data in first.items())
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 3
    # Deterministic: image i is the model's image for seed i.
    expected = pipe.generate(CLASS, steps=3, seed=2, width=32, height=32, progress=False)[0]
    class_images(pipe, tmp_path / "other", CLASS, 3, steps=3, progress=False)
    with Image.open(tmp_path / "other" / "class_00002.png") as made:
        assert made.tobytes() == expected.tobytes() and made.info["parameters"] == expected.info["parameters"]
    with pytest.raises(ValueError, match="captioned 'a shape', not 'a dog'"):
        class_images(pipe, folder, "a dog", 3, progress=False)


def test_pairs_cover_every_class_image_equally(instance_dir, class_dir):
    data = dreambooth_data(instance_dir, class_dir)
    assert len(data) == 3
    item = data.get(1, 0)
    assert item["text"] == INSTANCE and item["class_text"] == CLASS and item["index"] == 1
    used = [data.get(i, e)["class_index"] - 3 for e in range(4) for i in range(3)]  # 12 pairs, 4 class images
    assert sorted(used) == sorted(list(range(4)) * 3)


@torch.no_grad()
def held_out_loss(job: DreamBoothJob, data: DreamBoothDataset) -> float:
    """The loss on fixed batches, noise and timesteps (those of a different seed than training's)."""
    cfg = TrainConfig(out="", batch_size=3, seed=7)
    batches = [micro_batch(data, Stream(len(data), 7), s, 0, cfg) for s in range(4)]
    return sum(job.loss(b | {"models": job.modules}, s)[0].item() for b, s in batches) / len(batches)


def test_loss_goes_down_and_cached_latents_match(model_file, instance_dir, class_dir, tmp_path):
    data = dreambooth_data(instance_dir, class_dir)
    job = full_job(model_file)
    batch, seeds = micro_batch(data, Stream(len(data), 0), 0, 0, TrainConfig(out="", batch_size=3))
    with torch.no_grad():
        plain, parts = job.loss(batch | {"models": job.modules}, seeds)
        job.cache_latents(data)
        cached = job.loss(batch | {"models": job.modules}, seeds)[0]
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain.item() == pytest.approx(parts["instance_loss"] + parts["prior_loss"], rel=1e-6)

    before = held_out_loss(job, data)
    cfg = TrainConfig(out=str(tmp_path), steps=6, batch_size=3, lr=1e-3, warmup=2, ema_decay=0, log_every=1, save_every=6)
    train(job, data, cfg, progress=False)
    after = held_out_loss(job, data)
    assert after < 0.75 * before, (before, after)
    assert set(losses(tmp_path, "prior_loss")) and set(losses(tmp_path, "instance_loss"))


def test_prior_loss_weight_zero_is_training_on_the_instances_alone(model_file, instance_dir, class_dir, tmp_path):
    cfg = {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup": 2, "ema_decay": 0.9, "log_every": 1, "save_every": 4}
    data = dreambooth_data(instance_dir, class_dir)
    job = full_job(model_file, prior_loss_weight=0.0)
    job.cache_latents(data)
    ema = train(job, data, TrainConfig(out=str(tmp_path / "dreambooth"), **cfg), progress=False)

    pipe = sdtorch.load(model_file)
    alone = UNetJob(pipe.config, pipe.vae, pipe.clip, unet=pipe.unet, caption_dropout=0.0)
    instances = ImageCaptionDataset(instance_dir, 32, caption=INSTANCE)
    alone.cache_latents(instances)
    ema_alone = train(alone, instances, TrainConfig(out=str(tmp_path / "alone"), **cfg), progress=False)

    assert losses(tmp_path / "dreambooth") == losses(tmp_path / "alone")
    assert max(losses(tmp_path / "dreambooth", "prior_loss")) > 0  # the class pass ran, weighted by 0
    for name, trained in (("weights", job.job.unet), ("ema", ema["unet"])):
        other = alone.unet if name == "weights" else ema_alone["unet"]
        for (k, a), b in zip(trained.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), (name, k)


def run_dreambooth(model_file, instance_dir, class_dir, out: Path, steps: int) -> dict[str, torch.Tensor]:
    """Full fine-tuning with the text encoder, flips (no latent cache), 2 micro-batches per step."""
    torch.manual_seed(steps)  # nothing may depend on the global generator
    data = dreambooth_data(instance_dir, class_dir, flip=True)
    job = full_job(model_file, text_encoder=True)
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=2, grad_accum=2, lr=1e-3, warmup=2, ema_decay=0.9,
                      log_every=1, save_every=2)
    ema = train(job, data, cfg, progress=False)
    return {f"{kind}.{name}.{k}": v for kind, modules in (("w", job.modules), ("ema", ema))
            for name, m in modules.items() for k, v in m.state_dict().items()}


def test_resume_is_exact(model_file, instance_dir, class_dir, tmp_path):
    straight = run_dreambooth(model_file, instance_dir, class_dir, tmp_path / "a", 4)  # 8 samples: 3 epochs
    run_dreambooth(model_file, instance_dir, class_dir, tmp_path / "b", 2)  # "killed" after step 2 ...
    resumed = run_dreambooth(model_file, instance_dir, class_dir, tmp_path / "b", 4)  # ... and started again
    assert straight.keys() == resumed.keys() and any(k.startswith("w.clip.") for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, CFG.unet.context_dim, generator=g)
    tokens = pipe.tokenizer([INSTANCE], pad_id=pipe.config.clip.pad_token_id)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500.0]), context), pipe.clip(tokens)


def test_full_and_lora_commands_export_files_that_change_the_output(model_file, instance_dir, tmp_path):
    from sdtorch.cli import main

    base = outputs(sdtorch.load(model_file))
    classes = tmp_path / "classes"
    common = ["--checkpoint", str(model_file), "--instance-data", str(instance_dir), "--instance-prompt", INSTANCE,
              "--class-prompt", CLASS, "--class-data", str(classes), "--num-class-images", "2", "--class-steps", "2",
              "--train-text-encoder", "--steps", "3", "--batch-size", "2", "--lr", "1e-3"]
    assert main(["train", "dreambooth", *common, "--out", str(tmp_path / "full")]) == 0
    made = {p.name: p.stat().st_mtime_ns for p in classes.glob("*.png")}
    assert len(made) == 2
    model = sdtorch.load(tmp_path / "full" / "model.safetensors")
    assert model.config == CFG and model.prediction_source == "metadata"
    full = outputs(model)
    assert (full[0] - base[0]).abs().max() > 1e-4 and (full[1] - base[1]).abs().max() > 1e-4
    assert main(["generate", INSTANCE, "-c", str(tmp_path / "full" / "model.safetensors"), "--steps", "2",
                 "--out", str(tmp_path / "images")]) == 0

    assert main(["train", "dreambooth", *common, "--lora", "4", "--layers", "attn,ff",
                 "--out", str(tmp_path / "lora")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in classes.glob("*.png")} == made  # reused, not made again
    path = tmp_path / "lora" / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_num_reg_images"] == "2" and meta["ss_num_train_images"] == "3"
    pipe = sdtorch.load(model_file)
    pipe.load_lora(path)
    adapted = outputs(pipe)
    assert (adapted[0] - base[0]).abs().max() > 1e-4 and (adapted[1] - base[1]).abs().max() > 1e-4
