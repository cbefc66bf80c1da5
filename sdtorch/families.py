"""Model families as data: what tells SD 1.x from SD 2.x (and their inpainting variants) apart,
and what each implies. One table, read by loading, detection, `sdtorch info`, LoRA metadata and
the pipeline; a new family (SDXL, ControlNet, the x4 upscaler) is a new row, not a new branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdtorch.config import ModelConfig

# Where each model lives in an original single file (the one prefix table).
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",  # SD1: Hugging Face CLIPTextModel names
    "openclip": "cond_stage_model.model.",  # SD2: OpenCLIP names
}


@dataclass(frozen=True)
class Family:
    """One model family: how its text encoder is stored and what it defaults to."""

    name: str
    label: str  # for people (`sdtorch info`)
    text_layout: Literal["hf", "openclip"]  # how the text encoder is stored in single files
    text_prefix: str  # its key prefix there
    context_dim: int  # text-encoder width the UNet cross-attends to
    clip_skip: int  # A1111's default: 1 = last layer, 2 = penultimate
    latent_scale: float  # VAE latent scaling factor
    kohya_base: str  # kohya's `ss_base_model_version` of LoRAs trained on it
    text_act: str  # the text encoder's MLP activation
    pad_token_id: int  # what its tokenizer pads with
    v_hint: str | None  # a UNet key whose spread tells v- from eps-prediction files (ComfyUI's rule), if any


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD 1.x", "hf", PREFIXES["clip"], 768, 1, 0.18215, "sd_v1", "quick_gelu", 49407, None),
    "sd2": Family("sd2", "SD 2.x", "openclip", PREFIXES["openclip"], 1024, 2, 0.18215, "sd_v2", "gelu", 0,
                  "output_blocks.11.1.transformer_blocks.0.norm1.bias"),
}

# UNet input channels -> the image conditioning the UNet takes beside its latents.
CONCAT: dict[int, str] = {4: "", 9: "inpainting"}  # 9 = latents + mask + masked-image latents


def family_of(cfg: ModelConfig) -> Family:
    """The family whose text-encoder layout a config has (small and custom models included:
    the layout decides how files are read and written)."""
    return family_by_layout(cfg.clip_layout)


def family_by_layout(layout: str) -> Family:
    return next(f for f in FAMILIES.values() if f.text_layout == layout)


def concat_kind(cfg: ModelConfig) -> str:
    """"" for a plain UNet, "inpainting" for a 9-channel one; unknown channel counts are errors."""
    if cfg.unet.in_channels not in CONCAT:
        raise ValueError(f"a UNet with {cfg.unet.in_channels} input channels is not a known kind "
                         f"(known: {', '.join(map(str, CONCAT))})")
    return CONCAT[cfg.unet.in_channels]


def describe(cfg: ModelConfig) -> str:
    """A one-line name for what a config is: 'SD 1.x', 'SD 2.x inpainting', 'custom (emoji)'."""
    family = family_of(cfg)
    label = family.label
    if cfg.unet.context_dim != family.context_dim or cfg.unet.model_channels != 320:
        label = f"custom ({cfg.name})"
    kind = concat_kind(cfg)
    return f"{label} {kind}".strip()
