"""`sdtorch train vae|unet|clip`: the training jobs from the command line.

The same command runs on one process or under `torchrun --nproc_per_node N` (DDP; gloo on CPU).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from .config import PRESETS, ModelConfig

COMMON = {
    "steps": int, "batch_size": int, "grad_accum": int, "lr": float, "warmup": int,
    "grad_clip": float, "ema_decay": float, "seed": int, "log_every": int,
    "sample_every": int, "save_every": int,
}


def add_train_command(sub) -> None:
    parser = sub.add_parser("train", help="train the autoencoder, the text encoder or the UNet")
    jobs = parser.add_subparsers(dest="job", required=True)
    for name, help_ in (("vae", "the KL autoencoder"), ("clip", "the CLIP text encoder, contrastively"),
                        ("unet", "the UNet on frozen VAE + text encoder")):
        p = jobs.add_parser(name, help=help_)
        p.add_argument("--data", required=True, help="image folder (metadata.jsonl or .txt captions)")
        p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, samples/)")
        p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model architecture")
        p.add_argument("--size", type=int, default=None, help="training image size (default: the preset's)")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast")
        p.add_argument("--flip", action="store_true", help="random horizontal flips")
        for key, kind in COMMON.items():
            p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
        if name == "clip":
            p.add_argument("--patch-size", type=int, default=8, help="image tower ViT patch size")
            p.add_argument("--tower-width", type=int, default=256)
            p.add_argument("--tower-layers", type=int, default=6)
            p.add_argument("--embed-dim", type=int, default=256, help="joint embedding size")
        if name == "unet":
            p.add_argument("--vae", required=True, help="trained VAE (.safetensors from `train vae`)")
            p.add_argument("--clip", required=True, help="trained text encoder (.safetensors)")
            p.add_argument("--prediction", choices=["eps", "v"], default="eps")
            p.add_argument("--caption-dropout", type=float, default=0.1)
            p.add_argument("--scaling-factor", type=float, default=None,
                           help="latent scale (default: 1 / std of the training latents, measured)")
            p.add_argument("--prompts", nargs="*", default=[], help="prompts for the sample grids")


def _train_config(args):
    from .train import TrainConfig

    given = {k: getattr(args, k) for k in COMMON if getattr(args, k) is not None}
    return TrainConfig(out=args.out, bf16=args.bf16, **given)


def _dataset(args, preset: ModelConfig):
    from .data import ImageCaptionDataset

    return ImageCaptionDataset(args.data, args.size or preset.sample_size, flip=args.flip, seed=args.seed or 0)


def cmd_train(args: argparse.Namespace) -> int:
    from .jobs import UNetJob, VAEJob
    from .train import train

    preset = PRESETS[args.preset]
    data = _dataset(args, preset)
    cfg = _train_config(args)
    torch.manual_seed(cfg.seed)
    if args.job == "vae":
        preview = torch.stack([data[i]["image"] for i in _spread(len(data), 8)])
        job = VAEJob(preset.vae, preview=preview)
        ema = train(job, data, cfg)
        path = job.export(ema, Path(args.out) / "vae.safetensors")
    elif args.job == "clip":
        path = _train_clip(args, preset, data, cfg)
    else:
        vae, clip = _load_parts(args, preset)
        scale = args.scaling_factor or measure_scaling_factor(vae, data)
        preset = replace(preset, vae=replace(preset.vae, scaling_factor=scale), prediction=args.prediction)
        job = UNetJob(preset, vae, clip, caption_dropout=args.caption_dropout, preview_prompts=args.prompts)
        ema = train(job, data, cfg)
        path = job.export(ema, Path(args.out) / "model.safetensors")
    print(path)
    return 0


def _train_clip(args, preset: ModelConfig, data, cfg) -> Path:
    from .clip_train import ClipJob, ImageTowerConfig
    from .train import collate, train

    tower = ImageTowerConfig(image_size=data.size, patch_size=args.patch_size, width=args.tower_width,
                             layers=args.tower_layers, heads=max(1, args.tower_width // 64), embed_dim=args.embed_dim)
    preview = collate([data[i] for i in _spread(len(data), 16)])
    job = ClipJob(preset.clip, tower, preview=preview)
    ema = train(job, data, cfg)
    return job.export(ema, Path(args.out) / "clip.safetensors")


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over a dataset of n items (previews that show its variety)."""
    return sorted({i * n // k for i in range(min(k, n))})


def _load_parts(args, preset: ModelConfig):
    """The frozen VAE and text encoder for UNet training, strictly loaded."""
    from safetensors.torch import load_file

    from .checkpoint import load_strict
    from .clip import ClipTextModel
    from .vae import AutoencoderKL

    with torch.device("meta"):
        vae, clip = AutoencoderKL(preset.vae), ClipTextModel(preset.clip)
    load_strict(vae, load_file(args.vae), "VAE", torch.float32)
    text = {k: v for k, v in load_file(args.clip).items() if k.startswith("text_model.")}
    load_strict(clip, text, "text encoder", torch.float32)
    return vae, clip


@torch.no_grad()
def measure_scaling_factor(vae, data, n: int = 256) -> float:
    """1 / std of posterior-mean latents over (up to) n training images, as the SD authors set
    0.18215 for their autoencoder: diffusion then starts from latents of about unit variance."""
    images = torch.stack([data[i]["image"] for i in range(min(n, len(data)))])
    z = torch.cat([vae.encode(chunk).mean for chunk in images.split(32)])
    return float(1.0 / z.flatten().std())
