"""The condition-encoder seam (tokens from any encoder into the UNet's cross-attention), the
simulated scanner, and the vision-decoding demo's pieces, on tiny models."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sdtorch
from sdtorch.conditioning.encoders import BACKBONES, Backbone, ConditionEncoder, build, for_backbone, register_backbone
from sdtorch.config import TINY
from sdtorch.formats import checkpoint
from sdtorch.formats.files import CheckpointError
from sdtorch.generate import GenerationRequest
from sdtorch.generate.pipeline import Pipeline
from sdtorch.generate.request import RequestError
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.models.voxel import VoxelAEConfig
from sdtorch.training.decoding import ConditionedUNetJob, derangement, held_out, n_way_top1
from sdtorch.training.scanner import ScannerConfig, SimulatedScanner
from sdtorch.training.train import TrainConfig, train

VOXEL = VoxelAEConfig(depth=4, size=8, channels=(8,), code_channels=8)  # code (8, 2, 4, 4): 32 tokens


@dataclass(frozen=True)
class ToyConfig:
    features: int = 6
    tokens: int = 3
    width: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ToyConfig:
        return cls(**d)


class Toy(nn.Module):
    """(B, features) -> (B, tokens, width): a backbone that gives tokens directly."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.features, cfg.tokens * cfg.width)

    def forward(self, x):
        return self.linear(x).view(len(x), self.cfg.tokens, self.cfg.width)


register_backbone("toy", Backbone(Toy, ToyConfig, lambda c: (c.features,)))


def _pipe(encoder=None, seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    pipe = Pipeline(TINY, UNetModel(TINY.unet), AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip))
    pipe.condition_encoder = encoder
    return pipe


def _encoder(mode="replace", seed: int = 1) -> ConditionEncoder:
    torch.manual_seed(seed)
    enc = ConditionEncoder("toy", ToyConfig(), dim=TINY.unet.context_dim, tokens=3, code_dim=16, mode=mode)
    with torch.no_grad():
        enc.empty_tokens.normal_()  # as if trained: distinguishable from zeros
    return enc.eval()


def _request(condition, **kw) -> GenerationRequest:
    return GenerationRequest(kw.pop("prompt", ""), steps=3, sampler="euler", cfg_scale=kw.pop("cfg", 3.0), seed=0,
                             width=32, height=32, condition=condition, **kw)


def _contexts(pipe) -> list[torch.Tensor]:
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    return seen


def test_encoder_gives_tokens_of_the_unet_width_and_batches_one_input():
    enc = _encoder()
    x = torch.randn(6)
    cond = enc(enc.batched(x, 2))
    assert cond.crossattn.shape == (2, 3, TINY.unet.context_dim)
    assert torch.allclose(cond.crossattn[0], cond.crossattn[1], atol=1e-6)
    assert enc.empty(4).crossattn.shape == (4, 3, TINY.unet.context_dim)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        enc.batched(torch.randn(5), 2)
    with pytest.raises(ValueError, match="1 or 2"):
        enc.batched(torch.randn(3, 6), 2)


def test_voxel_encoder_token_count_read_off_the_backbone():
    enc = for_backbone("voxel", VOXEL, dim=32)
    assert enc.position.shape == (32, 32)  # 2 x 4 x 4 cells of the code
    assert enc(torch.randn(2, 4, 8, 8)).crossattn.shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        enc(torch.randn(2, 4, 8, 9))


def test_guidance_pairs_the_encoder_tokens_with_its_empty_condition():
    enc = _encoder()
    pipe = _pipe(enc)
    contexts = _contexts(pipe)
    x = torch.randn(6)
    pipe.run(_request(x))
    assert len(contexts) == 3  # one batched UNet call per step
    with torch.no_grad():
        cond, empty = enc(x[None]).crossattn[0], enc.empty_tokens
    halves = contexts[0]
    assert halves.shape == (2, 3, TINY.unet.context_dim)
    found = {("cond" if torch.allclose(h, cond, atol=1e-6) else "empty" if torch.allclose(h, empty, atol=1e-6) else "?")
             for h in halves}
    assert found == {"cond", "empty"}


def test_condition_changes_the_image_and_guidance_scale_matters():
    pipe = _pipe(_encoder())
    a, b = (np.asarray(pipe.run(_request(torch.randn(6, generator=torch.Generator().manual_seed(s)))).images[0],
                       dtype=float) for s in (0, 1))
    assert np.abs(a - b).mean() > 0.5
    x = torch.randn(6)
    g1, g3 = (np.asarray(pipe.run(_request(x, cfg=c)).images[0], dtype=float) for c in (1.0, 3.0))
    assert np.abs(g1 - g3).mean() > 0.5


def test_join_mode_appends_tokens_to_the_text_states():
    enc = _encoder(mode="join")
    pipe = _pipe(enc)
    contexts = _contexts(pipe)
    pipe.run(_request(torch.randn(6), prompt="a red circle"))
    assert contexts[0].shape == (2, 77 + 3, TINY.unet.context_dim)
    text = pipe.encode_prompt(["a red circle"])
    assert any(torch.allclose(h[:77], text[0], atol=1e-5) for h in contexts[0])


def test_bad_condition_requests_name_the_field():
    text_only, coded = _pipe(None), _pipe(_encoder())
    cases = [
        (text_only, _request(torch.randn(6)), "condition", "no condition encoder"),
        (coded, _request(None, prompt="a cat"), "condition", "give the encoder's input"),
        (coded, _request(torch.randn(7)), "condition", r"shape \(6,\)"),
        (coded, _request(torch.randn(6), prompt="a cat"), "prompt", "leave the prompt empty"),
        (coded, _request([1.0] * 6), "condition", "must be a tensor"),
    ]
    for pipe, request, field, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            pipe.run(request)
        assert e.value.field == field


def test_a_model_with_its_encoder_saves_and_loads_strictly(tmp_path):
    enc = for_backbone("voxel", VOXEL, dim=TINY.unet.context_dim)
    with torch.no_grad():
        enc.backbone.shift.normal_()
        enc.empty_tokens.normal_()
    pipe = _pipe(enc.eval())
    path = checkpoint.save(tmp_path / "coded.safetensors", pipe.unet, pipe.vae, pipe.clip, TINY, condition_encoder=enc)
    loaded = sdtorch.load(path)
    assert loaded.condition_encoder is not None and loaded.condition_encoder.spec() == enc.spec()
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.condition_encoder.state_dict()[k], v), k
    scan = torch.randn(4, 8, 8)
    same = [np.asarray(p.run(_request(scan)).images[0]) for p in (pipe, loaded)]
    assert np.array_equal(*same)

    sd = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    broken = dict(sd)
    del broken["condition_encoder.proj.weight"]
    save_file(broken, tmp_path / "missing.safetensors", meta)
    with pytest.raises(CheckpointError, match="condition encoder.*missing.*proj.weight"):
        sdtorch.load(tmp_path / "missing.safetensors")
    save_file(sd, tmp_path / "no_spec.safetensors", {k: v for k, v in meta.items() if k != checkpoint.ENCODER_KEY})
    with pytest.raises(CheckpointError, match="no 'sdtorch_condition_encoder' metadata"):
        sdtorch.load(tmp_path / "no_spec.safetensors")


def test_build_refuses_an_unknown_backbone():
    with pytest.raises(ValueError, match="unknown condition-encoder backbone 'mystery'"):
        build({"kind": "mystery", "config": {}, "dim": 8, "tokens": 1, "code_dim": 1})
    assert "voxel" in BACKBONES


class _Pairs:
    """8 (image, scan) pairs: coloured squares and their scans."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 3, 1, 1, generator=g).expand(8, 3, 32, 32) * 2 - 1
        self.scans = torch.randn(8, 4, 8, 8, generator=g)

    def __len__(self):
        return 8

    def get(self, i, epoch=0):
        return {"image": self.images[i], "measurement": self.scans[i], "index": i}


def test_a_few_training_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    enc = for_backbone("voxel", VOXEL, dim=TINY.unet.context_dim)
    enc.backbone.requires_grad_(False)
    job = ConditionedUNetJob(TINY, AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip), enc)
    data = _Pairs()
    job.cache_latents(data)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=40, batch_size=8, lr=2e-3, warmup=5, ema_decay=0.9,
                      log_every=5, save_every=40)
    train(job, data, cfg, progress=False)
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    frozen = for_backbone("voxel", VOXEL, dim=TINY.unet.context_dim)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert frozen.proj.weight.shape == enc.proj.weight.shape
    path = job.export({"unet": job.unet, "encoder": enc}, tmp_path / "model.safetensors")
    assert sdtorch.load(path).condition_encoder.spec() == enc.spec()


def test_scanner_is_deterministic_per_subject_and_scan_seed():
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    a, b = SimulatedScanner(ScannerConfig(subject=0)), SimulatedScanner(ScannerConfig(subject=0))
    assert a(images, [1, 2, 3]).shape == (3, 8, 16, 16)
    assert torch.equal(a(images, [1, 2, 3]), b(images, [1, 2, 3]))
    assert not torch.equal(a(images, [1, 2, 3]), a(images, [4, 5, 6]))  # new scans: new noise
    assert torch.equal(a.signal(images), b.signal(images))  # ... of the same signal
    other = SimulatedScanner(ScannerConfig(subject=1))
    assert (a.signal(images) - other.signal(images)).abs().mean() > 0.05  # another subject, another map
    dead = a.alive == 0
    assert 0.1 < dead.float().mean() < 0.3 and a.signal(images)[:, dead].abs().max() == 0


def test_n_way_identification_measure():
    g = torch.Generator().manual_seed(0)
    seen = torch.rand(60, 3, 16, 16, generator=g)
    assert n_way_top1(seen, seen, ways=50) == 1.0
    assert n_way_top1(seen + 0.05 * torch.randn(60, 3, 16, 16, generator=g), seen, ways=50) == 1.0
    shuffled = n_way_top1(seen[derangement(60, 0)], seen, ways=50)
    assert shuffled < 0.1  # unrelated images: chance is 2 %
    with pytest.raises(ValueError, match="at least 50"):
        n_way_top1(seen[:10], seen[:10], ways=50)
    assert len(held_out(3788)) == 199


def test_generate_command_takes_a_condition_file(tmp_path):
    enc = for_backbone("voxel", VOXEL, dim=TINY.unet.context_dim)
    pipe = _pipe(enc.eval())
    model = checkpoint.save(tmp_path / "coded.safetensors", pipe.unet, pipe.vae, pipe.clip, TINY, condition_encoder=enc)
    scan = torch.randn(4, 8, 8)
    np.save(tmp_path / "scan.npy", scan.numpy())
    cmd = [sys.executable, "-m", "sdtorch.cli", "generate", "--condition", str(tmp_path / "scan.npy"), "-c", str(model),
           "--steps", "3", "--sampler", "euler", "--scheduler", "karras", "--cfg", "3", "--seed", "0", "--width", "32", "--height", "32",
           "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from PIL import Image

    made = np.asarray(Image.open(next((tmp_path / "out").glob("*.png"))).convert("RGB"))
    assert np.array_equal(made, np.asarray(pipe.run(_request(scan)).images[0]))
    info = subprocess.run([sys.executable, "-m", "sdtorch.cli", "info", str(model)], capture_output=True, text=True,
                          timeout=120)
    assert "condition encoder: voxel backbone, 32 tokens x 32, mode replace" in info.stdout, info.stdout
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "nothing.npy")] + cmd[6:], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "condition file" in bad.stderr and "Traceback" not in bad.stderr


def test_decoder_demo_command_runs_end_to_end(tmp_path):
    """`sdtorch train decoder-demo` at toy length: scans, autoencoder, fine-tuned model, evaluation,
    picture, example scans; then `generate --condition` on one of its scans."""
    from sdtorch.training.data import build_emoji_dataset

    data = build_emoji_dataset(tmp_path / "emoji", 64, limit=120)
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "sdtorch.cli", "train", "decoder-demo", "--out", str(out), "--data", str(data),
           "--ae-steps", "4", "--ae-batch", "8", "--unet-steps", "3", "--unet-batch", "4", "--steps", "3",
           "--ways", "5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == len(held_out(120)) == 6 and results["ways"] == 5
    for key in ("decoded", "shuffled", "vae_round_trip"):
        assert 0 <= results[key] <= 1
    assert results["vae_round_trip"] >= 0.8  # the measure separates the seen images themselves
    assert (out / "decoding.png").is_file() and (out / "model.safetensors").is_file()
    scan = sorted((out / "held_out").glob("scan_*.npy"))[0]
    gen = subprocess.run([sys.executable, "-m", "sdtorch.cli", "generate", "--condition", str(scan), "-c",
                          str(out / "model.safetensors"), "--steps", "3", "--cfg", "3", "--seed", "1", "--out",
                          str(tmp_path / "gen")], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
