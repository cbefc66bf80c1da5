"""Vision decoding, simulated: draw the image a "subject" saw from a scan of them seeing it.

The recipe (after the latent-diffusion decoding of fMRI studies): compress the measurements with
an autoencoder, put its code into the UNet's cross-attention in place of the text, fine-tune,
and sample. No scans exist here, so `sdtorch.training.scanner.SimulatedScanner` makes them: a
fixed random, lossy, noisy map from each 64x64 built-in training image to an 8x16x16 tensor.

`run_demo` does it end to end into one folder:
1. the emoji images and one scan of each (scan seed = image index), held-out images set aside
   (every 19th: 199 of 3,788);
2. `VoxelAEJob`: the autoencoder on the training scans (reconstruction loss only);
3. `ConditionedUNetJob`: the built-in model's UNet fine-tuned on (scan, image) pairs, conditioned
   by a `ConditionEncoder` over the frozen autoencoder's code, with condition dropout so guidance
   has a learned empty condition;
4. the model (UNet, VAE, text encoder, condition encoder) as one safetensors file;
5. `evaluate`: n-way top-1 identification on the held-out images, against chance and against
   the same model given shuffled scans, with a similarity measure fixed before training
   (`pixcorr_features`: Pearson correlation of the images at 16x16).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sdtorch.conditioning.encoders import for_backbone
from sdtorch.formats import checkpoint
from sdtorch.models.voxel import VoxelAEConfig, VoxelAutoencoder
from sdtorch.training.jobs import UNetJob
from sdtorch.training.scanner import ScannerConfig, SimulatedScanner
from sdtorch.training.train import TrainConfig, rand_per_sample, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str
    data: str | None = None  # the emoji image folder; None: rendered into out/emoji64
    subject: int = 0  # the simulated subject (which fixed scanner map)
    limit: int | None = None  # use only the first N images (quick runs)
    ae_steps: int = 1000
    ae_batch: int = 64
    ae_lr: float = 1e-3
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 2e-4
    condition_dropout: float = 0.1
    bf16: bool = False
    # sampling and the evaluation (fixed before training)
    steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 3.0
    ways: int = 50
    seed: int = 0


def held_out(n: int) -> list[int]:
    """Every 19th image (index 7, 26, ...): 199 of the 3,788 emoji."""
    return [i for i in range(n) if i % 19 == 7]


def scan_all(dataset, scanner: SimulatedScanner, n: int, chunk: int = 256) -> torch.Tensor:
    """One scan of each of the first `n` images of `dataset` (scan seed = index): (n, D, s, s) float32."""
    out = []
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        images = torch.stack([dataset.get(i)["image"] for i in idx])
        out.append(scanner(images, idx))
    return torch.cat(out)


class Measured:
    """(image, measurement) pairs of the images `indices` of an image-caption dataset."""

    def __init__(self, images, measurements: torch.Tensor, indices: list[int]):
        self.images, self.measurements, self.indices = images, measurements, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int, epoch: int = 0) -> dict:
        j = self.indices[i]
        return {"image": self.images.get(j)["image"], "measurement": self.measurements[j], "index": i}


class Scans:
    """The measurements alone (the autoencoder's data)."""

    def __init__(self, measurements: torch.Tensor):
        self.measurements = measurements

    def __len__(self) -> int:
        return len(self.measurements)

    def get(self, i: int, epoch: int = 0) -> dict:
        return {"measurement": self.measurements[i]}


class VoxelAEJob:
    """The autoencoder on reconstruction (MSE in standardised units)."""

    def __init__(self, cfg: VoxelAEConfig, train_scans: torch.Tensor):
        self.ae = VoxelAutoencoder(cfg)
        self.ae.encoder.shift.copy_(train_scans.mean(0))
        self.ae.encoder.scale.copy_(train_scans.std(0).clamp(min=1e-3))
        self.modules = {"ae": self.ae}

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["measurement"]
        recon = batch["models"]["ae"](x)
        return F.mse_loss(recon.float(), self.ae.encoder.standardize(x)), {}

    def samples(self, ema, step):
        return None

    def export(self, ema: dict[str, nn.Module], path: Path) -> Path:
        from sdtorch.formats.atomic import save_safetensors

        return save_safetensors(ema["ae"].state_dict(), path, {"voxel_ae": json.dumps(self.ae.cfg.to_dict())})


class ConditionedUNetJob(UNetJob):
    """UNetJob's denoising loss with the context from a condition encoder instead of the text
    encoder; condition dropout swaps in the encoder's (learned) empty tokens."""

    def __init__(self, cfg, vae, clip, encoder: nn.Module, *, unet=None, condition_dropout: float = 0.1):
        super().__init__(cfg, vae, clip, unet=unet, caption_dropout=condition_dropout)
        self.encoder = encoder
        self.modules = {"unet": self.unet, "encoder": encoder}

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        models = batch["models"]
        z0 = self.latents(batch["image"], seeds, batch.get("index"))
        drop = rand_per_sample(seeds, 2) < self.caption_dropout
        context = models["encoder"].dropped(batch["measurement"], drop).float()
        return self.denoising_loss(models["unet"], z0, context, seeds), {}

    def samples(self, ema, step):
        return None

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save(path, ema["unet"], self.vae, self.clip, self.cfg, dtype=dtype,
                               condition_encoder=ema["encoder"])


# -- evaluation ---------------------------------------------------------------------------------


def pixcorr_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(N, 3, H, W) images -> (N, 3·size²) unit vectors, centred: their dot products are the Pearson
    correlations of the images at size x size (the image-similarity measure of the evaluation)."""
    x = F.adaptive_avg_pool2d(images.float(), size).flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-8)


def n_way_top1(generated: torch.Tensor, seen: torch.Tensor, ways: int = 50, seed: int = 0) -> float:
    """Fraction of i for which generated[i] is nearer (pixcorr) to seen[i] than to each of
    ways - 1 other seen images drawn at random (fixed by `seed`). Chance: 1 / ways."""
    g, s = pixcorr_features(generated), pixcorr_features(seen)
    sims = g @ s.T  # (N, N)
    n = len(sims)
    if n < ways:
        raise ValueError(f"{ways}-way identification needs at least {ways} images, got {n}")
    rng = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(n):
        others = torch.tensor([j for j in range(n) if j != i])
        distractors = others[torch.randperm(n - 1, generator=rng)[: ways - 1]]
        correct += bool(sims[i, i] > sims[i, distractors].max())
    return correct / n


def decode(pipe, measurements: torch.Tensor, cfg: DemoConfig, seed: int, batch: int = 50,
           progress: bool = True) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [0, 1] from measurements (N, D, n, n); image k of a batch starting
    at s is drawn from seed + s (one generator per batch)."""
    from sdtorch.generate.request import GenerationRequest

    out = []
    for start in tqdm(range(0, len(measurements), batch), desc="decode", disable=not progress):
        m = measurements[start:start + batch]
        request = GenerationRequest("", steps=cfg.steps, sampler=cfg.sampler, scheduler="karras", cfg_scale=cfg.cfg_scale,
                                    seed=seed + start, batch_size=len(m), condition=m)
        out += [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in pipe.run(request).images]
    return torch.stack(out)


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation with no fixed point (the shuffled-measurement control)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(n, generator=g)
        if not bool((p == torch.arange(n)).any()):
            return p


def evaluate(pipe, measurements: torch.Tensor, seen: torch.Tensor, cfg: DemoConfig, progress: bool = True,
             other_subject: torch.Tensor | None = None) -> dict:
    """n-way top-1 of decoded images, of decoding shuffled measurements, of decoding another
    subject's scans of the same images (when given), and the measure's ceiling (the seen images
    after a VAE round trip); seen (N, 3, H, W) in [0, 1]."""
    decoded = decode(pipe, measurements, cfg, cfg.seed, progress=progress)
    shuffled = decode(pipe, measurements[derangement(len(measurements), cfg.seed + 1)], cfg, cfg.seed, progress=progress)
    other = {}
    if other_subject is not None:
        other["other_subject"] = n_way_top1(decode(pipe, other_subject, cfg, cfg.seed, progress=progress), seen,
                                            cfg.ways, cfg.seed)
    with torch.no_grad():
        vae = pipe.vae
        rt = vae.decode(vae.encode(seen.to(pipe.dtype) * 2 - 1).mean).float().clamp(-1, 1) / 2 + 0.5
    w = cfg.ways
    return {
        "images": len(seen),
        "ways": w,
        "chance": 1 / w,
        "decoded": n_way_top1(decoded, seen, w, cfg.seed),
        "shuffled": n_way_top1(shuffled, seen, w, cfg.seed),
        "vae_round_trip": n_way_top1(rt, seen, w, cfg.seed),
        **other,
    }, decoded


# -- the whole demo -----------------------------------------------------------------------------


def _train_config(cfg: DemoConfig, name: str, steps: int, batch: int, lr: float, warmup: int) -> TrainConfig:
    return TrainConfig(out=str(Path(cfg.out) / name), steps=steps, batch_size=batch, lr=lr, warmup=warmup,
                       ema_decay=0.999, bf16=cfg.bf16, seed=cfg.seed, log_every=20, save_every=100)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Everything above into `cfg.out`; returns the evaluation (also out/results.json)."""
    import sdtorch
    from sdtorch.training.data import ImageCaptionDataset, build_emoji_dataset

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data) if cfg.data else out / "emoji64"
    if not (data / "metadata.jsonl").exists():
        build_emoji_dataset(data, 64)
    images = ImageCaptionDataset(data, 64)
    n = min(len(images), cfg.limit or len(images))
    test = held_out(n)
    train_idx = [i for i in range(n) if i not in set(test)]
    scanner = SimulatedScanner(ScannerConfig(subject=cfg.subject))
    scans = scan_all(images, scanner, n)
    torch.save({"scans": scans, "held_out": test, "scanner": asdict(scanner.cfg)}, out / "scans.pt")

    ae_cfg = VoxelAEConfig(depth=scanner.cfg.depth, size=scanner.cfg.size)
    ae_job = VoxelAEJob(ae_cfg, scans[train_idx])
    ema = train(ae_job, Scans(scans[train_idx]), _train_config(cfg, "ae", cfg.ae_steps, cfg.ae_batch, cfg.ae_lr, 100),
                progress=progress)
    ae = ema["ae"]
    ae_job.export(ema, out / "ae" / "voxel_ae.safetensors")

    base = sdtorch.load()  # the built-in model: its UNet is fine-tuned, its VAE stays frozen
    encoder = for_backbone("voxel", ae_cfg, dim=base.config.unet.context_dim)
    encoder.backbone.load_state_dict(ae.encoder.state_dict())
    encoder.backbone.requires_grad_(False)
    unet = base.unet.float().train().requires_grad_(True)
    job = ConditionedUNetJob(base.config, base.vae.float(), base.clip.float(), encoder, unet=unet,
                             condition_dropout=cfg.condition_dropout)
    pairs = Measured(images, scans, train_idx)
    job.cache_latents(pairs)
    ema = train(job, pairs, _train_config(cfg, "unet", cfg.unet_steps, cfg.unet_batch, cfg.unet_lr, 100),
                progress=progress)
    model = job.export(ema, out / "model.safetensors", dtype=torch.float16)

    pipe = sdtorch.load(model)
    seen = torch.stack([images.get(i)["image"] for i in test]) / 2 + 0.5
    other = SimulatedScanner(ScannerConfig(subject=cfg.subject + 1))(seen * 2 - 1, test)  # the same images, another map
    results, decoded = evaluate(pipe, scans[test], seen, cfg, progress=progress, other_subject=other)
    results |= {"subject": cfg.subject, "train_images": len(train_idx), "ae_steps": cfg.ae_steps,
                "unet_steps": cfg.unet_steps, "similarity": "pixcorr 16x16", "sampler": cfg.sampler,
                "sampling_steps": cfg.steps, "cfg_scale": cfg.cfg_scale, "model": str(model)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _write_examples(out, scans, test, images)
    picture(pipe, scans, test, seen, cfg).save(out / "decoding.png")
    return results


def _write_examples(out: Path, scans: torch.Tensor, test: list[int], images, count: int = 8) -> None:
    """A few held-out scans as .npy (for `sdtorch generate --condition`), beside the images seen."""
    from sdtorch.generate.output import to_pil

    folder = out / "held_out"
    folder.mkdir(exist_ok=True)
    for i in test[:count]:
        np.save(folder / f"scan_{i:04d}.npy", scans[i].numpy())
        to_pil(images.get(i)["image"].unsqueeze(0) / 2 + 0.5)[0].save(folder / f"seen_{i:04d}.png")


def picture(pipe, scans: torch.Tensor, test: list[int], seen: torch.Tensor, cfg: DemoConfig, rows: int = 6,
            samples: int = 4, slices: int = 4):
    """Rows: seen image | measurement slices | several decoded samples (different seeds)."""
    from PIL import Image

    from sdtorch.generate.output import to_pil

    from PIL import ImageDraw

    cell, top = 64, 16
    picked = list(range(0, len(test), max(1, len(test) // rows)))[:rows]
    sheet = Image.new("RGB", ((1 + slices + samples) * (cell + 4) + 8, top + len(picked) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    depth = scans.shape[1]
    for x, label in ((0, "seen"), (cell + 8, f"scan: slices {', '.join(str(s * depth // slices) for s in range(slices))}"),
                     ((1 + slices) * (cell + 4) + 8, f"decoded from the scan ({samples} seeds)")):
        draw.text((x + 2, 2), label, fill="black")
    for r, k in enumerate(picked):
        m = scans[test[k]]
        y = top + r * (cell + 4)
        sheet.paste(to_pil(seen[k:k + 1])[0], (0, y))
        for s in range(slices):
            sl = m[s * depth // slices]
            grey = ((sl - sl.min()) / (sl.max() - sl.min() + 1e-8) * 255).byte().numpy()
            sheet.paste(Image.fromarray(grey).resize((cell, cell), Image.Resampling.NEAREST), ((1 + s) * (cell + 4) + 4, y))
        decoded = decode(pipe, m.unsqueeze(0).expand(samples, *m.shape), cfg, 1000 + k, progress=False)
        for s, im in enumerate(to_pil(decoded)):
            sheet.paste(im, ((1 + slices + s) * (cell + 4) + 8, y))
    return sheet
