"""Training jobs for `sdtorch.train.train`: what is trained, on which loss, and what comes out.

- `VAEJob`: the KL autoencoder (reconstruction + KL).
- `UNetJob`: the noise predictor on latents of a frozen autoencoder, conditioned on a frozen
  text encoder, eps- or v-prediction, with caption dropout so classifier-free guidance works.
(The contrastive CLIP job lives in `sdtorch.clip_train`.)

Each job reads its models from `batch["models"]` inside `loss` (they may be wrapped in
DistributedDataParallel there) and draws every random number from the per-sample seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .clip import ClipTextModel
from .config import ModelConfig, VAEConfig
from .schedule import alphas_cumprod
from .tokenizer import ClipTokenizer
from .train import grid, rand_per_sample, randn_per_sample
from .unet import UNetModel
from .vae import AutoencoderKL


class VAEJob:
    """L1 + MSE reconstruction plus a small KL pull towards N(0, I) (the LDM recipe, without the
    perceptual and adversarial terms: emoji are flat colour and the reconstruction loss suffices)."""

    def __init__(self, cfg: VAEConfig, *, kl_weight: float = 1e-6, preview: torch.Tensor | None = None):
        self.vae = AutoencoderKL(cfg)
        self.modules = {"vae": self.vae}
        self.kl_weight = kl_weight
        self.preview = preview  # (N, 3, H, W) in [-1, 1]: images shown with their reconstructions

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]
        noise = randn_per_sample(self._latent_shape(x), seeds)
        recon, posterior = batch["models"]["vae"](x, noise)
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / noise[0].numel()  # per latent element
        return l1 + mse + self.kl_weight * kl * noise[0].numel(), {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}

    def _latent_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        f = self.vae.downscale
        return self.vae.cfg.embed_dim, x.shape[-2] // f, x.shape[-1] // f

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if self.preview is None:
            return None
        from .pipeline import to_pil

        vae = ema["vae"]
        recon = vae.decode(vae.encode(self.preview).mean)
        pairs = [im for a, b in zip(to_pil((self.preview + 1) / 2), to_pil((recon.clamp(-1, 1) + 1) / 2)) for im in (a, b)]
        return grid(pairs, cols=8)

    def export(self, ema: dict[str, nn.Module], path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema["vae"].state_dict().items()}, str(path))
        return path


class UNetJob:
    """Denoising score matching on latents: the UNet learns eps (or v) at a random timestep."""

    def __init__(self, cfg: ModelConfig, vae: AutoencoderKL, clip: ClipTextModel, *,
                 caption_dropout: float = 0.1, preview_prompts: list[str] | None = None):
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        self.modules = {"unet": self.unet}
        self.vae, self.clip = vae.eval().requires_grad_(False), clip.eval().requires_grad_(False)
        self.tokenizer = ClipTokenizer()
        self.caption_dropout = caption_dropout
        self.alphas = alphas_cumprod(cfg.schedule)  # (T,)
        self.preview_prompts = preview_prompts or []

    @torch.no_grad()
    def condition(self, images: torch.Tensor, texts: list[str], seeds: torch.Tensor):
        """Frozen parts: latents z0 = posterior sample * scaling_factor, text states (dropout -> "")."""
        posterior = self.vae.encode(images)
        z0 = (posterior.mean + posterior.std * randn_per_sample(posterior.mean.shape[1:], seeds, 1))
        drop = rand_per_sample(seeds, 2) < self.caption_dropout
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
        tokens = self.tokenizer(texts, pad_id=self.cfg.clip.pad_token_id)
        return z0 * self.cfg.vae.scaling_factor, self.clip(tokens).float()

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z0, context = self.condition(batch["image"], batch["text"], seeds)
        T = len(self.alphas)
        t = (rand_per_sample(seeds, 3) * T).long().clamp(max=T - 1)  # (B,)
        noise = randn_per_sample(z0.shape[1:], seeds, 4)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        target = noise if self.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z0
        pred = batch["models"]["unet"](x_t, t.float(), context)
        loss = F.mse_loss(pred.float(), target)
        return loss, {}

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if not self.preview_prompts:
            return None
        from .pipeline import Pipeline

        pipe = Pipeline(self.cfg, ema["unet"], self.vae, self.clip)
        images = []
        for prompt in self.preview_prompts:
            images += pipe.generate(prompt, steps=20, sampler="dpmpp_2m", cfg_scale=5.0, seed=0, progress=False)
        return grid(images, cols=min(8, len(images)))

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save(path, ema["unet"], self.vae, self.clip, self.cfg, dtype=dtype)
