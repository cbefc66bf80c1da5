"""Textual-inversion training (sdtorch/ti_train.py): only the new vectors learn, the loss goes
down, the file loads as an embedding and is read as it was trained, resume is exact, and the
command line trains one that `generate --embeddings` uses. A random-weight tiny model at 32x32
pixels stands in for a real one."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from sdtorch.conditioning.embeddings import load_embedding
from sdtorch.config import TINY
from sdtorch.formats import checkpoint
from sdtorch.generate.pipeline import Pipeline
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.training.data import ImageCaptionDataset
from sdtorch.training.ti_train import EmbeddingJob
from sdtorch.training.train import TrainConfig, collate, train

CFG = replace(TINY, sample_size=32)
NAME, TEMPLATES = "sks-style", ["a {} shape", "a picture in the style of {}"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The concept: 3 uncaptioned pictures of a magenta triangle, placed a little differently."""
    root = tmp_path_factory.mktemp("ti_images")
    for i, dx in enumerate((0, 3, 6)):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).polygon([(4 + dx, 26), (14 + dx, 5), (24 + dx, 26)], fill=(230, 20, 200))
        im.save(root / f"concept_{i}.png")
    return root


def new_job(seed: int = 0, **kw) -> EmbeddingJob:
    torch.manual_seed(seed)
    unet, vae, clip = UNetModel(CFG.unet), AutoencoderKL(CFG.vae), ClipTextModel(CFG.clip)
    return EmbeddingJob(CFG, unet, vae, clip, **({"name": NAME, "init_word": "shape", "vectors": 2,
                                                   "templates": TEMPLATES} | kw))


def frozen_state(job: EmbeddingJob) -> dict[str, torch.Tensor]:
    base = job.base
    return {f"{part}.{k}": v.clone() for part, m in (("unet", base.unet), ("vae", base.vae), ("clip", base.clip))
            for k, v in m.state_dict().items()}


def fixed_batch_loss(job: EmbeddingJob, data) -> float:
    """The loss on one fixed batch: the same images, templates, noise and timesteps every time."""
    batch = collate([data[i % len(data)] for i in range(24)]) | {"models": job.modules}
    with torch.no_grad():
        return job.loss(batch, torch.arange(100, 124))[0].item()


def logged(out: Path, column: str = "loss") -> list[float]:
    with open(out / "log.csv", newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> SimpleNamespace:
    """12 steps of batch 4 (lr 5e-3, as A1111) from the word "shape", with the frozen weights and
    the fixed-batch loss taken before."""
    data = ImageCaptionDataset(images, 32, caption="")
    job = new_job()
    job.base.cache_latents(data)
    before = SimpleNamespace(frozen=frozen_state(job), vectors=job.embedding.vectors.detach().clone(),
                             loss=fixed_batch_loss(job, data))
    out = tmp_path_factory.mktemp("ti_run")
    ema = train(job, data, TrainConfig(out=str(out), steps=12, batch_size=4, lr=5e-3, warmup=0, weight_decay=0.0,
                                       ema_decay=0.0, log_every=1, save_every=12), progress=False)
    return SimpleNamespace(job=job, ema=ema, data=data, out=out, before=before)


def test_the_loss_goes_down(trained):
    """Measured on a fixed batch (single rows of the log differ by their random timesteps). On a
    random-weight UNet the text moves the loss little: the drop is small, but it is the vectors'."""
    after = fixed_batch_loss(trained.job, trained.data)
    assert after < 0.997 * trained.before.loss, (trained.before.loss, after)
    assert len(logged(trained.out)) == 12


def test_only_the_new_vectors_change(trained):
    job = trained.job
    clip_rows = job.base.clip.text_model.embeddings.token_embedding.weight
    shape = job.tokenizer.encode("shape")
    assert len(shape) == 1 and torch.equal(trained.before.vectors, clip_rows[shape * 2])  # both from "shape"
    assert not torch.equal(job.embedding.vectors, trained.before.vectors)
    after = frozen_state(job)
    assert after.keys() == trained.before.frozen.keys()
    for k, v in after.items():
        assert torch.equal(v, trained.before.frozen[k]), k  # bit for bit
    state = torch.load(trained.out / "last.pt", weights_only=True)
    assert list(state["modules"]["embedding"]) == ["vectors"]  # the checkpoint holds the vectors only


def test_the_saved_embedding_loads_and_is_read_as_trained(trained, tmp_path):
    job, ema = trained.job, trained.ema
    pt = job.export(ema, tmp_path / "embeddings" / f"{NAME}.pt", step=12)
    st = job.export(ema, tmp_path / f"{NAME}.safetensors", step=12)
    raw = torch.load(pt, weights_only=True)
    assert list(raw["string_to_param"]) == ["*"] and raw["name"] == NAME  # A1111's .pt
    for path in (pt, st):
        emb = load_embedding(path)
        assert (emb.name, emb.step) == (NAME, 12)
        assert torch.equal(emb.vectors, ema["embedding"].vectors.detach())

    pipe = Pipeline(CFG, job.base.unet, job.base.vae, job.base.clip)
    prompt = f"a {NAME} shape"
    plain = pipe.encode_prompt([prompt])
    assert pipe.load_embeddings(tmp_path / "embeddings") == [NAME]
    with_embedding = pipe.encode_prompt([prompt])
    assert (with_embedding - plain).abs().max() > 1e-3
    with torch.no_grad():
        as_trained = job.embedding(job.base.clip, [prompt], job.tokenizer, job.pad_id)
    assert torch.equal(with_embedding, as_trained)  # generation reads the name as training did
    assert torch.equal(pipe.encode_prompt(["a red shape"]), pipe.encode_prompt(["a red shape"], syntax="plain"))


def _run(images: Path, out: Path, steps: int) -> dict[str, torch.Tensor]:
    data = ImageCaptionDataset(images, 32, caption="", flip=True)
    job = new_job()
    job.embedding.vectors.data.normal_()  # a different start than the resumed state: it must be overwritten
    ema = train(job, data, TrainConfig(out=str(out), steps=steps, batch_size=4, grad_accum=2, lr=5e-3, warmup=2,
                                       ema_decay=0.9, log_every=1, save_every=2), progress=False)
    return {"vectors": job.embedding.vectors.detach().clone(), "ema": ema["embedding"].vectors.detach().clone()}


def test_resume_equals_an_uninterrupted_run(images, tmp_path):
    straight = _run(images, tmp_path / "a", 4)
    _run(images, tmp_path / "b", 2)  # "killed" after step 2 ...
    resumed = _run(images, tmp_path / "b", 4)  # ... and started again
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


def test_captions_must_hold_the_name_where_it_is_read():
    job = new_job(templates=[])
    assert job.captions(["a {} on white", "{}, {}"], torch.tensor([1, 2])) == [
        f"a {NAME} on white", f"{NAME}, {NAME}"]  # the dataset's own captions
    with pytest.raises(ValueError, match="has no {}"):
        job.fill("a shape")
    with pytest.raises(ValueError, match="not 1"):
        job.fill("a {}s shape")  # "sks-styles": not the name's tokens
    with pytest.raises(ValueError, match="2 times, not 1"):
        new_job(name="shape", templates=["a {} shape"])  # the name is a word of the template
    with pytest.raises(ValueError, match="file name"):
        new_job(name="a/b")
    with pytest.raises(ValueError, match="no tokens"):
        new_job(init_word="")


def test_templates_are_drawn_per_sample():
    job = new_job()
    texts = job.captions([""] * 32, torch.arange(32))
    assert {t.replace(NAME, "{}") for t in texts} == set(TEMPLATES)
    assert texts == job.captions([""] * 32, torch.arange(32))  # from the seeds alone


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ti_model") / "tiny.safetensors"
    return checkpoint.save(path, UNetModel(CFG.unet), AutoencoderKL(CFG.vae), ClipTextModel(CFG.clip), CFG)


def test_command_line_trains_an_embedding_that_generate_reads(model_file, images, tmp_path, capsys):
    from sdtorch.cli import main

    out = tmp_path / "run"
    args = ["train", "embedding", "-c", str(model_file), "--data", str(images), "--out", str(out), "--name", NAME,
            "--init-word", "triangle", "--vectors", "2", "--template", *TEMPLATES, "--steps", "2",
            "--batch-size", "2", "--save-every", "2", "--sample-every", "2", "--prompts", "a {} tree"]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(out / "embeddings" / f"{NAME}.pt"), str(out / f"{NAME}.safetensors")]
    assert load_embedding(out / f"{NAME}.safetensors").vectors.shape == (2, CFG.clip.width)
    assert (out / "samples" / "step_0000002.png").exists()
    assert main(["generate", f"a {NAME} tree", "-c", str(model_file), "--embeddings", str(out / "embeddings"),
                 "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "images")]) == 0
    assert f"embeddings: {NAME}" in capsys.readouterr().err

    captioned = tmp_path / "captioned"  # without --template the captions need a {}
    captioned.mkdir()
    (captioned / "a.png").write_bytes((images / "concept_0.png").read_bytes())
    (captioned / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a magenta triangle"}) + "\n")
    assert main(["train", "embedding", "-c", str(model_file), "--data", str(captioned), "--out", str(tmp_path / "x"),
                 "--name", NAME, "--steps", "1", "--batch-size", "1"]) == 2
    assert "has no {}" in capsys.readouterr().err
