"""Training jobs for `sdtorch.training.train.train`: what is trained, on which loss, and what comes out.

- `VAEJob`: the KL autoencoder (reconstruction + KL).
- `UNetJob`: the noise predictor on latents of a frozen autoencoder, conditioned on a frozen
  text encoder, eps- or v-prediction, with caption dropout so classifier-free guidance works.
- `LayoutJob`: UNetJob with a colour layout of each image beside the latents (semantic synthesis).
- `ControlNetJob`: a ControlNet for a frozen model, on control images made from the training images.
- `LoRAJob`: UNetJob's loss on a frozen model; only LoRA layers (`sdtorch.adapters.lora`) train.
- `TinyDecoderJob`: a TAESD-style tiny decoder distilled from a frozen VAE's decoder.
(The contrastive CLIP job lives in `sdtorch.training.clip_train`, DreamBooth's in `sdtorch.training.dreambooth`.)

Each job reads its models from `batch["models"]` inside `loss` (they may be wrapped in
DistributedDataParallel there) and draws every random number from the per-sample seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.adapters import lora, lora_train
from sdtorch.conditioning.micro import Micro, micro_vector
from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import ModelConfig, VAEConfig
from sdtorch.families import family_of
from sdtorch.formats import checkpoint
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.condition import Condition
from sdtorch.models.taesd import TinyDecoder, TinyDecoderConfig
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.sampling.schedule import alphas_cumprod
from sdtorch.training.train import grid, rand_per_sample, randn_per_sample


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
        from sdtorch.generate.pipeline import to_pil

        vae = ema["vae"]
        recon = vae.decode(vae.encode(self.preview).mean)
        pairs = [im for a, b in zip(to_pil((self.preview + 1) / 2), to_pil((recon.clamp(-1, 1) + 1) / 2)) for im in (a, b)]
        return grid(pairs, cols=8)

    def export(self, ema: dict[str, nn.Module], path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema["vae"].state_dict().items()}, str(path))
        return path


class UNetJob:
    """Denoising score matching on latents: the UNet learns eps (or v) at a random timestep.
    train_text_encoder=True fine-tunes the text encoder with it (DreamBooth's option)."""

    def __init__(self, cfg: ModelConfig, vae: AutoencoderKL, clip: ClipTextModel, *,
                 caption_dropout: float = 0.1, preview_prompts: list[str] | None = None,
                 unet: UNetModel | None = None, text_grad: bool = False, train_text_encoder: bool = False,
                 clip2: ClipTextModel | None = None):
        self.cfg = cfg
        self.clip2 = None if clip2 is None else clip2.eval().requires_grad_(False)  # SDXL's second encoder
        self.unet = UNetModel(cfg.unet) if unet is None else unet  # given: fine-tune that one
        self.modules = {"unet": self.unet}
        self.vae, self.clip = vae.eval().requires_grad_(False), clip.eval().requires_grad_(False)
        if train_text_encoder:
            self.modules["clip"] = clip.requires_grad_(True)
            text_grad = True
        self.tokenizer = ClipTokenizer()
        self.caption_dropout = caption_dropout
        self.alphas = alphas_cumprod(cfg.schedule)  # (T,)
        self.preview_prompts = preview_prompts or []
        self.text_grad = text_grad  # keep the text encoder's graph (it, or its LoRA layers, train)

    latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    cache_bf16: bool = False

    @torch.no_grad()
    def cache_latents(self, dataset, chunk: int = 64) -> None:
        """Encode every item of a dataset whose items never change (no flips, no random crops) once:
        the posterior's mean and std per item, so steps skip the VAE encoder. Done up front in
        fixed chunks, so an interrupted and resumed run uses the very same numbers."""
        means, stds = [], []
        for start in range(0, len(dataset), chunk):
            images = torch.stack([dataset.get(i)["image"] for i in range(start, min(start + chunk, len(dataset)))])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cache_bf16):
                posterior = self.vae.encode(images)
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        self.latent_cache = torch.cat(means), torch.cat(stds)

    def condition(self, images: torch.Tensor, texts: list[str], seeds: torch.Tensor, index: list[int] | None = None,
                  clip: nn.Module | None = None):
        """Latents z0 = posterior sample * scaling_factor (frozen VAE), text states of `clip` (default
        the frozen one; captions dropped -> "")."""
        z0 = self.latents(images, seeds, index)
        drop = rand_per_sample(seeds, 2) < self.caption_dropout
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            if self.clip2 is None:
                tokens = self.tokenizer(texts, pad_id=self.cfg.clip.pad_token_id)
                return z0, (self.clip if clip is None else clip)(tokens).float()
            return z0, self.condition_xl(texts, self.clip if clip is None else clip, images.shape[-2:])

    def condition_xl(self, texts: list[str], clip: nn.Module, size) -> Condition:
        """SDXL: both encoders' states concatenated, the pooled text and the image's size as the
        UNet's vector (no crop: the dataset's images are taken whole)."""
        states, pooled = [], None
        for encoder in (clip, self.clip2):
            z, p = encoder.encode(self.tokenizer(texts, pad_id=encoder.cfg.pad_token_id))
            states.append(z.float())
            pooled = p if p is not None else pooled
        size = tuple(int(n) for n in size)
        return Condition(torch.cat(states, -1), micro_vector(self.cfg, pooled.float(), Micro(size, (0, 0), size)))

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        models = batch["models"]
        z0, context = self.condition(batch["image"], batch["text"], seeds, batch.get("index"), models.get("clip"))
        return self.denoising_loss(models["unet"], z0, context, seeds), {}

    def latents(self, images: torch.Tensor, seeds: torch.Tensor, index: list[int] | None = None) -> torch.Tensor:
        """z0 = a posterior sample of the frozen VAE (cached when `cache_latents` ran) * scaling_factor."""
        with torch.no_grad():
            if self.latent_cache is not None and index is not None:
                mean, std = (c[index] for c in self.latent_cache)
            else:
                posterior = self.vae.encode(images)
                mean, std = posterior.mean, posterior.std
            return (mean + std * randn_per_sample(mean.shape[1:], seeds, 1)) * self.cfg.vae.scaling_factor

    def denoising_loss(self, unet: nn.Module, z0: torch.Tensor, context: torch.Tensor, seeds: torch.Tensor,
                       concat: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of the UNet's eps (or v) at a random timestep per sample; `concat`: image channels
        beside the noisy latents (a layout model's layout)."""
        T = len(self.alphas)
        t = (rand_per_sample(seeds, 3) * T).long().clamp(max=T - 1)  # (B,)
        noise = randn_per_sample(z0.shape[1:], seeds, 4)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        target = noise if self.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z0
        if concat is not None:
            x_t = torch.cat([x_t, concat.to(x_t)], dim=1)
        if isinstance(context, Condition):  # SDXL: text states and the vector
            pred = unet(x_t, t.float(), context.crossattn, context.vector)
        else:
            pred = unet(x_t, t.float(), context)
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if not self.preview_prompts:
            return None
        from sdtorch.generate.pipeline import Pipeline

        pipe = Pipeline(self.cfg, ema["unet"], self.vae, ema.get("clip", self.clip), clip2=self.clip2)
        images = []
        for prompt in self.preview_prompts:
            images += pipe.generate(prompt, steps=20, sampler="dpmpp_2m", cfg_scale=5.0, seed=0, progress=False)
        return grid(images, cols=min(8, len(images)))

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save(path, ema["unet"], self.vae, ema.get("clip", self.clip), self.cfg, dtype=dtype,
                               clip2=self.clip2)


class LayoutJob(UNetJob):
    """Semantic synthesis: UNetJob with each image's colour layout (`conditioning.layout`) beside
    the latents; the UNet has 3 more input channels. `unet`: where to start (a text-to-image UNet
    is widened with zero weights for the layout channels, so training starts from its images)."""

    def __init__(self, cfg: ModelConfig, vae: AutoencoderKL, clip: ClipTextModel, *, unet: UNetModel | None = None,
                 **kw):
        if unet is not None and unet.cfg.in_channels == cfg.unet.in_channels - 3:
            unet = widen_input(unet, cfg.unet)
        super().__init__(cfg, vae, clip, unet=unet, **kw)

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from sdtorch.conditioning.layout import colour_layout

        models = batch["models"]
        z0, context = self.condition(batch["image"], batch["text"], seeds, batch.get("index"), models.get("clip"))
        layout = colour_layout(batch["image"], tuple(z0.shape[-2:]))
        return self.denoising_loss(models["unet"], z0, context, seeds, concat=layout), {}

    def samples(self, ema: dict[str, nn.Module], step: int):
        return None  # previews need layouts: benchmarks/layout.py draws and scores them

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save(path, ema["unet"], self.vae, self.clip, self.cfg, dtype=dtype)


class ControlNetJob(UNetJob):
    """ControlNet training (Zhang et al. 2023): UNet, VAE and text encoder frozen; a ControlNet
    copied from the UNet's encoder (its new layers zero, so it starts as no change) learns to steer
    the UNet with a control image made from each training image by preprocessor `module`
    (`sdtorch.conditioning.preprocess`). Half the captions are dropped, as in the paper, so that it
    learns to read the control image alone."""

    def __init__(self, cfg: ModelConfig, vae: AutoencoderKL, clip: ClipTextModel, unet: UNetModel, *,
                 module: str = "canny", caption_dropout: float = 0.5, embed_channels: tuple[int, ...] | None = None):
        from sdtorch.models.controlnet import ControlNet, ControlNetConfig

        super().__init__(cfg, vae, clip, unet=unet.eval().requires_grad_(False), caption_dropout=caption_dropout)
        f = 2 ** (len(cfg.vae.ch_mult) - 1)  # the hint encoder downscales as the VAE does
        embed = embed_channels or (16, 32, 96, 256)[: f.bit_length()]
        self.net = ControlNet.from_unet(unet, ControlNetConfig(cfg.unet, embed_channels=embed))
        self.modules = {"controlnet": self.net}
        self.module = module

    def hints(self, images: torch.Tensor) -> torch.Tensor:
        """Training images (B, 3, H, W) in [-1, 1] -> their control images (B, 3, H, W) in [0, 1]."""
        import numpy as np
        from PIL import Image

        from sdtorch.conditioning.preprocess import preprocess

        out = []
        for x in images:
            pixels = ((x.permute(1, 2, 0).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            hint = np.asarray(preprocess(self.module, Image.fromarray(pixels)), dtype=np.float32) / 255
            out.append(torch.from_numpy(hint).permute(2, 0, 1))
        return torch.stack(out)

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from sdtorch.adapters.control import with_residuals

        net = batch["models"]["controlnet"]
        z0, context = self.condition(batch["image"], batch["text"], seeds, batch.get("index"))
        hint = self.hints(batch["image"])

        def controlled(x, t, c):
            return with_residuals(self.unet, net(x, hint, t, c), x, t, c)

        return self.denoising_loss(controlled, z0, context, seeds), {}

    def samples(self, ema: dict[str, nn.Module], step: int):
        return None

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        from sdtorch.formats import controlnet

        return controlnet.save(path, ema["controlnet"], dtype)


def widen_input(unet: UNetModel, cfg) -> UNetModel:
    """A copy of `unet` built from `cfg` (more input channels, maybe class labels): the old weights
    kept, the new input channels' and a new class embedding's zero (the UNet computes exactly what
    it did until training moves them)."""
    wide = UNetModel(cfg)
    sd = unet.state_dict()
    old = sd["input_blocks.0.0.weight"]
    first = torch.zeros(old.shape[0], cfg.in_channels, *old.shape[2:], dtype=old.dtype)
    first[:, : old.shape[1]] = old
    new = {k: torch.zeros_like(v) for k, v in wide.state_dict().items() if k not in sd}
    wide.load_state_dict(sd | new | {"input_blocks.0.0.weight": first})
    return wide


class LoRAJob:
    """LoRA training as kohya's sd-scripts does it: the base UNet (and text encoder) frozen, the
    LoRA layers of `network` trained on UNetJob's loss; exports a kohya-format .safetensors."""

    def __init__(self, cfg: ModelConfig, unet: UNetModel, vae: AutoencoderKL, clip: ClipTextModel,
                 network: lora.LoRANetwork, *, caption_dropout: float = 0.0,
                 preview_prompts: list[str] | None = None, metadata: dict[str, str] | None = None,
                 clip2: ClipTextModel | None = None):
        unet.eval().requires_grad_(False)
        text_grad = any(model == "clip" for model, _ in network.targets)
        if text_grad and clip2 is not None:
            raise ValueError("text-encoder LoRA training for two text encoders (SDXL) is not supported; "
                             "train the UNet's LoRA")
        self.base = UNetJob(cfg, vae, clip, unet=unet, text_grad=text_grad, caption_dropout=caption_dropout,
                            preview_prompts=preview_prompts, clip2=clip2)
        self.network = network
        self.modules = {"lora": network}
        self.metadata = metadata or {}
        self.stack = lora.LoRAStack(unet, clip, clip2)  # the LoRA layers act through hooks on the base models
        self.active = self.stack.add(network)

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        inner = {k: v for k, v in batch.items() if k != "models"} | {"models": {"unet": self.base.unet}}
        return batch["models"]["lora"](self.base.loss, inner, seeds)  # through DDP when distributed

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if not self.base.preview_prompts:
            return None
        self.stack.remove(self.active)
        preview = self.stack.add(ema["lora"])
        try:
            return self.base.samples({"unet": self.base.unet}, step)
        finally:
            self.stack.remove(preview)
            self.active = self.stack.add(self.network)

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype | None = None) -> Path:
        cfg = self.base.cfg
        return lora_train.save(ema["lora"], path, cfg.unet, v2=family_of(cfg).kohya_base == "sd_v2",
                               metadata={"ss_base_model_version": family_of(cfg).kohya_base} | self.metadata,
                               dtype=dtype)


class TinyDecoderJob:
    """A tiny decoder (`sdtorch.models.taesd`) learns the frozen VAE's decoder: sampler-space
    latents (the posterior mean times the scaling factor) -> the VAE's decode of them, L1 + MSE
    in [0, 1]. `cache(images)` encodes and decodes every training image once, up front; the
    batches' "index" picks from them."""

    def __init__(self, cfg: ModelConfig, vae: AutoencoderKL, *, width: int = 64, preview: list[int] | None = None):
        self.cfg, self.vae = cfg, vae.eval().requires_grad_(False)
        upsamples = vae.downscale.bit_length() - 1
        self.decoder = TinyDecoder(TinyDecoderConfig(cfg.vae.z_channels, upsamples, width))
        self.modules = {"tiny_decoder": self.decoder}
        self.preview = preview or []  # dataset indices shown as VAE / tiny pairs
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def cache(self, images: torch.Tensor, chunk: int = 64) -> None:
        """images: (N, 3, H, W) in [-1, 1], the dataset's items in order."""
        latents, targets = [], []
        for start in range(0, len(images), chunk):
            z = self.vae.encode(images[start : start + chunk]).mean
            latents.append(z * self.cfg.vae.scaling_factor)
            targets.append((self.vae.decode(z).clamp(-1, 1) + 1) / 2)
        self.pairs = torch.cat(latents), torch.cat(targets)

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z, target = (t[batch["index"]] for t in self.pairs)
        out = batch["models"]["tiny_decoder"](z)
        l1, mse = (out - target).abs().mean(), (out - target).pow(2).mean()
        return l1 + mse, {"l1": l1.item(), "mse": mse.item()}

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if not self.preview:
            return None
        from sdtorch.generate.pipeline import to_pil

        z, target = (t[self.preview] for t in self.pairs)
        tiny = ema["tiny_decoder"].decode(z)
        return grid([im for a, b in zip(to_pil(target), to_pil(tiny)) for im in (a, b)], cols=8)

    def export(self, ema: dict[str, nn.Module], path: Path, dtype: torch.dtype = torch.float16) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.to(dtype).contiguous() for k, v in ema["tiny_decoder"].state_dict().items()}, str(path))
        return path
