"""`sdtorch train vae|unet|clip|lora|dreambooth|embedding|decoder-demo`: the training jobs from the command line.

The same command runs on one process or under `torchrun --nproc_per_node N` (DDP; gloo on CPU).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from sdtorch.config import PRESETS, ModelConfig
from sdtorch.training.options import COMMON, train_config


def add_train_command(sub) -> None:
    parser = sub.add_parser("train", help="train the autoencoder, the text encoder, the UNet, a LoRA, DreamBooth, "
                                "or a textual-inversion embedding")
    jobs = parser.add_subparsers(dest="job", required=True)
    for name, help_ in (("vae", "the KL autoencoder"), ("clip", "the CLIP text encoder, contrastively"),
                        ("unet", "the UNet on frozen VAE + text encoder"),
                        ("lora", "a LoRA (kohya format) for an existing checkpoint")):
        p = jobs.add_parser(name, help=help_)
        p.add_argument("--data", required=True, help="image folder (metadata.jsonl or .txt captions)")
        p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, samples/)")
        if name != "lora":
            p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model architecture")
        p.add_argument("--size", type=int, default=None, help="training image size (default: the model's)")
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
        if name == "lora":
            p.add_argument("--rank", type=int, default=4, help="LoRA rank (kohya's network_dim)")
            p.add_argument("--text-encoder", action="store_true", help="also train LoRA layers in the text encoder")
            _fine_tune_arguments(p)
    _add_dreambooth_command(jobs)
    _add_decoder_demo_command(jobs)

    add_embedding_command(jobs)  # textual inversion (sdtorch/ti_train.py)


def _add_decoder_demo_command(jobs) -> None:
    from sdtorch.training.decoding import DemoConfig

    d = DemoConfig(out="")
    p = jobs.add_parser("decoder-demo", help="vision decoding on simulated scans: scanner, autoencoder, the built-in "
                        "model fine-tuned on (scan, image) pairs, n-way identification (sdtorch.training.decoding)")
    p.add_argument("--out", required=True, help="run folder (scans, autoencoder, model.safetensors, results.json)")
    p.add_argument("--data", default=None, help="emoji image folder (default: rendered into OUT/emoji64)")
    for name in ("subject", "limit", "ae_steps", "ae_batch", "unet_steps", "unet_batch", "steps", "ways", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("ae_lr", "unet_lr", "condition_dropout", "cfg_scale"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (pays only where the CPU has bf16 units)")


def _decoder_demo(args) -> dict:
    from dataclasses import fields

    from sdtorch.training.decoding import DemoConfig, run_demo

    return run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig) if hasattr(args, f.name)}))


def _add_dreambooth_command(jobs) -> None:
    p = jobs.add_parser("dreambooth", help="DreamBooth: fine-tune a checkpoint (or a LoRA) on a few images of a subject")
    p.add_argument("--instance-data", required=True, help="folder of the subject's images (captions not needed)")
    p.add_argument("--instance-prompt", required=True, help='caption of every instance image, e.g. "a sks dog"')
    p.add_argument("--class-prompt", required=True, help='the subject\'s class, e.g. "a dog"')
    p.add_argument("--class-data", required=True, help="folder of class images; missing ones are generated there")
    p.add_argument("--num-class-images", type=int, default=100)
    p.add_argument("--class-steps", type=int, default=25, help="sampler steps per generated class image")
    p.add_argument("--prior-loss-weight", type=float, default=1.0)
    p.add_argument("--train-text-encoder", action="store_true",
                   help="fine-tune the text encoder too (with --lora: LoRA layers in it)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK", help="train LoRA layers of this rank instead "
                   "of the full weights (writes lora.safetensors, kohya format)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, samples/)")
    p.add_argument("--size", type=int, default=None, help="training image size (default: the model's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    for key, kind in COMMON.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    _fine_tune_arguments(p)


def _fine_tune_arguments(p) -> None:
    """Options of the jobs that start from an existing checkpoint (lora, dreambooth)."""
    p.add_argument("--checkpoint", "-c", required=True, help="the base model (.safetensors / .ckpt / diffusers folder)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="the base model's (default: detected)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank (default: rank)")
    p.add_argument("--layers", default="attn", help="LoRA layers, comma-separated UNet layer groups: attn "
                   "(to_q/k/v/out), ff (feed-forward), proj (proj_in/out), conv (ResBlock and resampler layers)")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="of the written file")
    p.add_argument("--prompts", nargs="*", default=[], help="prompts for the sample grids")


def _dataset(args, preset: ModelConfig):
    from sdtorch.training.data import ImageCaptionDataset

    return ImageCaptionDataset(args.data, args.size or preset.sample_size, flip=args.flip, seed=args.seed or 0)


def cmd_train(args: argparse.Namespace) -> int:
    from sdtorch.training.jobs import UNetJob, VAEJob
    from sdtorch.training.train import train

    if args.job == "embedding":

        print(*train_embedding(args), sep="\n")
        return 0
    if args.job == "decoder-demo":
        import json

        print(json.dumps(_decoder_demo(args), indent=2))
        return 0
    if args.job in ("lora", "dreambooth"):
        print(_train_lora(args) if args.job == "lora" else _train_dreambooth(args))
        return 0
    preset = PRESETS[args.preset]
    data = _dataset(args, preset)
    cfg = train_config(args)
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
        if not args.flip and data.center_crop:  # items never change: encode them once
            job.cache_bf16 = args.bf16
            job.cache_latents(data)
        ema = train(job, data, cfg)
        path = job.export(ema, Path(args.out) / "model.safetensors")
    print(path)
    return 0


def _train_clip(args, preset: ModelConfig, data, cfg) -> Path:
    from sdtorch.training.clip_train import ClipJob, ImageTowerConfig
    from sdtorch.training.train import collate, train

    tower = ImageTowerConfig(image_size=data.size, patch_size=args.patch_size, width=args.tower_width,
                             layers=args.tower_layers, heads=max(1, args.tower_width // 64), embed_dim=args.embed_dim)
    preview = collate([data[i] for i in _spread(len(data), 16)])
    job = ClipJob(preset.clip, tower, preview=preview)
    ema = train(job, data, cfg)
    return job.export(ema, Path(args.out) / "clip.safetensors")


def _train_lora(args) -> Path:
    from sdtorch.generate.loading import DTYPES, load
    from sdtorch.training.train import train

    pipe = load(args.checkpoint, prediction=args.prediction)
    cfg = train_config(args)
    data = _dataset(args, pipe.config)
    job = _lora_job(args, pipe, cfg, rank=args.rank, text_encoder=args.text_encoder,
                    metadata={"ss_num_train_images": str(len(data))})
    ema = train(job, data, cfg)
    return job.export(ema, Path(args.out) / "lora.safetensors", dtype=DTYPES[args.save_dtype])


def _lora_job(args, pipe, cfg, *, rank: int, text_encoder: bool, metadata: dict[str, str]):
    """A new LoRA network (`--alpha`, `--layers`) on the loaded model, as a LoRAJob."""
    from sdtorch.adapters.lora_train import new_network
    from sdtorch.training.jobs import LoRAJob

    layers = tuple(g.strip() for g in args.layers.split(",") if g.strip())
    network = new_network(pipe.unet, pipe.clip, rank=rank, alpha=args.alpha, layers=layers,
                          text_encoder=text_encoder, generator=torch.Generator().manual_seed(cfg.seed))
    metadata = {"ss_sd_model_name": Path(args.checkpoint).name, "ss_learning_rate": str(cfg.lr),
                "ss_max_train_steps": str(cfg.steps), "sdtorch_layers": ",".join(layers)} | metadata
    return LoRAJob(pipe.config, pipe.unet, pipe.vae, pipe.clip, network, caption_dropout=args.caption_dropout,
                   preview_prompts=args.prompts, metadata=metadata, clip2=pipe.clip2)


def _train_dreambooth(args) -> Path:
    """Full fine-tuning (model.safetensors) or, with --lora RANK, a LoRA (lora.safetensors)."""
    from sdtorch.generate.loading import DTYPES, load
    from sdtorch.training.dreambooth import DreamBoothJob
    from sdtorch.training.jobs import UNetJob
    from sdtorch.training.train import train

    pipe = load(args.checkpoint, prediction=args.prediction)
    # diffusers' DreamBooth example: batches of one subject image (+ one class image), a small constant lr, no EMA.
    cfg = train_config(args, steps=400, batch_size=1, warmup=0, ema_decay=0.0, lr=1e-4 if args.lora else 5e-6)
    data = _dreambooth_data(args, pipe, cfg.seed)
    if args.lora:
        inner = _lora_job(args, pipe, cfg, rank=args.lora, text_encoder=args.train_text_encoder,
                          metadata={"ss_num_train_images": str(len(data)), "ss_num_reg_images": str(len(data.classes))})
    else:
        inner = UNetJob(pipe.config, pipe.vae, pipe.clip, unet=pipe.unet, clip2=pipe.clip2,
                        caption_dropout=args.caption_dropout,
                        preview_prompts=args.prompts, train_text_encoder=args.train_text_encoder)
    job = DreamBoothJob(inner, prior_loss_weight=args.prior_loss_weight)
    if not args.flip:  # items never change: encode them once
        job.unet_job.cache_bf16 = args.bf16
        job.cache_latents(data)
    ema = train(job, data, cfg)
    name = "lora.safetensors" if args.lora else "model.safetensors"
    return job.export(ema, Path(args.out) / name, dtype=DTYPES[args.save_dtype])


def _dreambooth_data(args, pipe, seed: int):
    """Generate the missing class images (process 0 only, the others wait), then pair them with
    the instance images."""
    import torch.distributed as dist

    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.dreambooth import DreamBoothDataset, class_images
    from sdtorch.training.train import init_distributed

    size = args.size or pipe.config.sample_size
    if init_distributed()[0] == 0:
        class_images(pipe, args.class_data, args.class_prompt, args.num_class_images, size=size, steps=args.class_steps)
    if dist.is_initialized():
        dist.barrier()
    instances = ImageCaptionDataset(args.instance_data, size, flip=args.flip, seed=seed, caption=args.instance_prompt)
    classes = ImageCaptionDataset(args.class_data, size, flip=args.flip, seed=seed, caption=args.class_prompt)
    classes.items = classes.items[: args.num_class_images]  # the folder may hold more
    return DreamBoothDataset(instances, classes, seed=seed)


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over a dataset of n items (previews that show its variety)."""
    return sorted({i * n // k for i in range(min(k, n))})


def _load_parts(args, preset: ModelConfig):
    """The frozen VAE and text encoder for UNet training, strictly loaded."""
    from sdtorch.formats.checkpoint import load_strict
    from sdtorch.formats.files import read_state_dict
    from sdtorch.models.clip import ClipTextModel
    from sdtorch.models.vae import AutoencoderKL

    with torch.device("meta"):
        vae, clip = AutoencoderKL(preset.vae), ClipTextModel(preset.clip)
    load_strict(vae, read_state_dict(args.vae)[0], "VAE", torch.float32)
    text = {k: v for k, v in read_state_dict(args.clip)[0].items() if k.startswith("text_model.")}
    load_strict(clip, text, "text encoder", torch.float32)
    return vae, clip


@torch.no_grad()
def measure_scaling_factor(vae, data, n: int = 256) -> float:
    """1 / std of posterior-mean latents over (up to) n training images, as the SD authors set
    0.18215 for their autoencoder: diffusion then starts from latents of about unit variance."""
    images = torch.stack([data[i]["image"] for i in _spread(len(data), n)])
    z = torch.cat([vae.encode(chunk).mean for chunk in images.split(32)])
    return float(1.0 / z.flatten().std())


def add_embedding_command(jobs) -> None:
    """`sdtorch train embedding`: textual inversion."""
    p = jobs.add_parser("embedding", help="textual inversion: new token vectors for a name, the model frozen")
    p.add_argument("--checkpoint", "-c", required=True, help="the model (.safetensors / .ckpt / diffusers folder)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="the model's (default: detected)")
    p.add_argument("--data", required=True, help="image folder (captions with {} needed only without --template)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, samples/, the embedding)")
    p.add_argument("--name", required=True, help="the trigger word, e.g. sks-style (also the file name)")
    p.add_argument("--init-word", default="*", help="start from this word's token embeddings")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (token slots the name takes)")
    p.add_argument("--template", nargs="+", default=[], help='captions with {} for the name, e.g. "a {} emoji" '
                   "(one drawn per sample); default: the dataset's captions, each with a {}")
    p.add_argument("--prompts", nargs="*", default=[], help="prompts for the sample grids ({} = the name); "
                   "default: the first template")
    p.add_argument("--size", type=int, default=None, help="training image size (default: the model's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    for key, kind in COMMON.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)


def train_embedding(args) -> list[Path]:
    """Run `sdtorch train embedding`; returns OUT/embeddings/NAME.pt and OUT/NAME.safetensors."""
    from sdtorch.generate.loading import load
    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.ti_train import EmbeddingJob
    from sdtorch.training.train import train

    pipe = load(args.checkpoint, prediction=args.prediction)
    # A1111's recipe: lr 5e-3, no weight decay (it would pull the vectors towards 0), no EMA.
    cfg = train_config(args, steps=3000, batch_size=4, lr=5e-3, weight_decay=0.0, ema_decay=0.0)
    caption = "" if args.template else None  # with templates the folder may be bare images
    data = ImageCaptionDataset(args.data, args.size or pipe.config.sample_size, flip=args.flip, seed=cfg.seed,
                               caption=caption)
    prompts = args.prompts or (args.template or [data.items[0][1]])[:1]
    job = EmbeddingJob(pipe.config, pipe.unet, pipe.vae, pipe.clip, name=args.name, init_word=args.init_word,
                       vectors=args.vectors, templates=args.template, preview_prompts=prompts)
    if not args.template:
        for _, text in data.items:
            job.fill(text)  # every caption checked before training starts
    if not args.flip and data.center_crop:  # items never change: encode them once
        job.base.cache_bf16 = args.bf16
        job.base.cache_latents(data)
    ema = train(job, data, cfg)
    out = Path(args.out)
    # Apart: the run folder's last.pt is no embedding, and one folder with both files would name
    # the trigger word twice.
    return [job.export(ema, out / "embeddings" / f"{args.name}.pt", step=cfg.steps),
            job.export(ema, out / f"{args.name}.safetensors", step=cfg.steps)]
