"""Contrastive CLIP training: model shapes, a tiny run that learns, export round trip."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import TINY
from sdtorch.formats.checkpoint import CheckpointError, load_strict, read_state_dict
from sdtorch.models.clip import ClipTextModel
from sdtorch.training.clip_train import ClipJob, ClipModel, ImageTowerConfig, contrastive_loss, load_clip_model, load_text_encoder
from sdtorch.training.data import ImageCaptionDataset
from sdtorch.training.train import TrainConfig, collate, train

TOWER = ImageTowerConfig(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=32)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "triangle", "cross")


def draw(shape: str, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (32, 32), "white")
    d = ImageDraw.Draw(image)
    if shape == "square":
        d.rectangle((6, 6, 25, 25), fill=colour)
    elif shape == "circle":
        d.ellipse((4, 4, 27, 27), fill=colour)
    elif shape == "triangle":
        d.polygon([(16, 3), (29, 28), (3, 28)], fill=colour)
    else:
        d.rectangle((12, 2, 19, 29), fill=colour)
        d.rectangle((2, 12, 29, 19), fill=colour)
    return image


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> ImageCaptionDataset:
    """16 images, one per (colour, shape), captioned "a red square" and so on."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            name = f"{colour}_{shape}.png"
            draw(shape, rgb).save(root / name)
            rows.append({"file_name": name, "text": f"a {colour} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageCaptionDataset(root, size=16)


@pytest.fixture(scope="module")
def trained(shapes_dataset, tmp_path_factory):
    """A 30-step run: (job, EMA modules, run folder)."""
    out = tmp_path_factory.mktemp("clip_run")
    torch.manual_seed(0)
    preview = collate([shapes_dataset[i] for i in range(0, 16, 2)])
    job = ClipJob(TINY.clip, TOWER, preview=preview)
    cfg = TrainConfig(out=str(out), steps=30, batch_size=8, lr=1e-3, warmup=5, ema_decay=0.99,
                      save_every=10, log_every=5, sample_every=30)
    ema = train(job, shapes_dataset, cfg, progress=False)
    return job, ema, out


def test_model_shapes_and_normalisation():
    torch.manual_seed(0)
    model = ClipModel(TINY.clip, TOWER)
    tokens = ClipTokenizer()(["a red square", "a much longer caption about a blue circle"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.image(images).shape == (2, TOWER.width)
    text_emb, image_emb, scale = model(tokens, images)
    assert text_emb.shape == image_emb.shape == (2, TOWER.embed_dim)
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(tokens, images)[2].item() == pytest.approx(math.log(100))
    # Cutting the padding after the last end token changes nothing (causal attention).
    full = model.text_projection(model.text.pooled(tokens, model.text(tokens, clip_skip=1)))
    torch.testing.assert_close(text_emb, torch.nn.functional.normalize(full, dim=-1))
    with pytest.raises(ValueError, match="expected images"):
        model.image(torch.zeros(1, 3, 8, 8))


def test_contrastive_loss_of_perfect_and_random_pairs():
    emb = torch.eye(4)
    loss, acc = contrastive_loss(emb, emb, torch.tensor(math.log(100)))
    assert loss.item() < 1e-6 and acc.item() == 1.0
    loss, _ = contrastive_loss(emb, emb, torch.tensor(-30.0))  # scale ~0: uniform over 4 captions
    assert loss.item() == pytest.approx(math.log(4), abs=1e-5)


def test_training_learns_to_match_captions(trained):
    _, _, out = trained
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    # Each row is one step's batch of 8 (noisy): compare the first row with the mean of the last two.
    loss = [float(r["loss"]) for r in rows]
    acc = [float(r["acc"]) for r in rows]
    assert loss[0] > 1.5 and (loss[-1] + loss[-2]) / 2 < 0.5 * loss[0], loss  # log(8) = 2.08 at chance
    assert (acc[-1] + acc[-2]) / 2 >= max(acc[0] + 0.25, 0.5), acc
    assert Image.open(out / "samples" / "step_0000030.png").size == (9 * 16, 8 * 16)
    assert (out / "last.pt").is_file()


def test_trained_model_retrieves_captions(trained, shapes_dataset):
    """Image -> caption retrieval over all 16 pairs with the EMA weights (chance: 1/16)."""
    job, ema, _ = trained
    batch = collate([shapes_dataset[i] for i in range(16)])
    with torch.no_grad():
        text_emb, image_emb, _ = ema["clip"](job.tokens(batch["text"]), batch["image"])
    accuracy = ((image_emb @ text_emb.T).argmax(dim=1) == torch.arange(16)).float().mean().item()
    assert accuracy >= 0.375, accuracy


def test_export_round_trip_and_text_encoder_for_sd(trained, shapes_dataset, tmp_path):
    job, ema, _ = trained
    path = job.export(ema, tmp_path / "clip.safetensors")
    loaded = load_clip_model(path)
    batch = collate([shapes_dataset[i] for i in range(8)])
    tokens = job.tokens(batch["text"])
    with torch.no_grad():
        for a, b in zip(ema["clip"](tokens, batch["image"]), loaded(tokens, batch["image"])):
            assert torch.equal(a, b)

    sd, metadata = read_state_dict(path)
    assert {"logit_scale", "text_projection.weight", "image_projection.weight"} <= set(sd)
    assert all(k.startswith(("text_model.", "image.", "text_projection.", "image_projection.", "logit_scale"))
               for k in sd)
    text = ClipTextModel(TINY.clip)
    load_strict(text, {k: v for k, v in sd.items() if k.startswith("text_model.")}, "text encoder", torch.float32)
    with torch.no_grad():
        assert torch.equal(text(tokens), ema["clip"].text(tokens))
        assert torch.equal(load_text_encoder(path)(tokens), text(tokens))

    save_file(sd, str(tmp_path / "bare.safetensors"))  # no configs
    with pytest.raises(CheckpointError, match="not a ClipJob export"):
        load_clip_model(tmp_path / "bare.safetensors")
