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
    "sgm": "conditioner.embedders.",  # SDXL (Stability's sgm): one entry per text encoder, below
}


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family: how single files store it, where, and how it is read."""

    layout: Literal["hf", "openclip"]  # Hugging Face CLIPTextModel names, or OpenCLIP's
    prefix: str  # its key prefix in single files
    act: str  # its MLP activation
    pad_token_id: int  # what its tokenizer pads with
    clip_skip: int  # A1111's default: 1 = last layer, 2 = penultimate
    final_norm: bool = True  # whether the final layer norm is applied to that layer
    pooled: bool = False  # whether its pooled output (through text_projection) conditions the UNet


# SDXL's micro-conditioning: how many numbers each condition is (each embedded by micro_dim features).
MICRO_VALUES = {"original_size": 2, "crop": 2, "target_size": 2, "aesthetic_score": 1}

_CLIP_L = dict(layout="hf", act="quick_gelu", pad_token_id=49407)
_OPENCLIP = dict(layout="openclip", act="gelu", pad_token_id=0)


@dataclass(frozen=True)
class Family:
    """One model family: how its text encoders are stored and what it defaults to."""

    name: str
    label: str  # for people (`sdtorch info`)
    layout: str  # `ModelConfig.clip_layout` of its models
    text: tuple[TextSlot, ...]  # its text encoders, in the order their states are concatenated
    context_dim: int  # text-encoder width the UNet cross-attends to
    latent_scale: float  # VAE latent scaling factor
    kohya_base: str  # kohya's `ss_base_model_version` of LoRAs trained on it
    v_hint: str | None = None  # a UNet key whose spread tells v- from eps-prediction files (ComfyUI's rule)
    model_channels: int = 320  # of its real UNets (anything else is a custom model of the layout)
    # An empty negative prompt conditions on zeros (SDXL base: diffusers' force_zeros_for_empty_prompt, A1111)
    zero_negative: bool = False
    micro: tuple[str, ...] = ()  # its micro-conditioning (`ModelConfig.micro`)

    @property
    def text_layout(self) -> str:
        return self.text[0].layout

    @property
    def text_prefix(self) -> str:
        return self.text[0].prefix


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD 1.x", "hf", (TextSlot(prefix=PREFIXES["clip"], clip_skip=1, **_CLIP_L),), 768, 0.18215,
                  "sd_v1"),
    "sd2": Family("sd2", "SD 2.x", "openclip", (TextSlot(prefix=PREFIXES["openclip"], clip_skip=2, **_OPENCLIP),),
                  1024, 0.18215, "sd_v2", "output_blocks.11.1.transformer_blocks.0.norm1.bias"),
    "sdxl": Family("sdxl", "SDXL", "sdxl", (
        TextSlot(prefix=PREFIXES["sgm"] + "0.transformer.", clip_skip=2, final_norm=False, **_CLIP_L),
        TextSlot(prefix=PREFIXES["sgm"] + "1.model.", clip_skip=2, final_norm=False, pooled=True, **_OPENCLIP),
    ), 2048, 0.13025, "sdxl_base_v1-0", zero_negative=True, micro=("original_size", "crop", "target_size")),
    "sdxl-refiner": Family("sdxl-refiner", "SDXL refiner", "sdxl-refiner", (
        TextSlot(prefix=PREFIXES["sgm"] + "0.model.", clip_skip=2, final_norm=False, pooled=True, **_OPENCLIP),
    ), 1280, 0.13025, "sdxl_refiner_v1-0", model_channels=384, micro=("original_size", "crop", "aesthetic_score")),
}


def family_of(cfg: ModelConfig) -> Family:
    """The family whose text-encoder layout a config has (small and custom models included:
    the layout decides how files are read and written)."""
    return family_by_layout(cfg.clip_layout)


def family_by_layout(layout: str) -> Family:
    return next(f for f in FAMILIES.values() if f.layout == layout)


def text_configs(cfg: ModelConfig) -> list:
    """The config's text encoders (`ClipConfig`s) in the family's order."""
    return [cfg.clip] if cfg.clip2 is None else [cfg.clip, cfg.clip2]


# (UNet input channels, whether it takes class labels) -> the image conditioning it takes beside its
# latents (what each takes: `sdtorch.generate.concat`). 9 = latents + mask + masked-image latents;
# 8 = latents + the source image's latents (instruct-pix2pix); 5 = latents + a depth map (SD 2
# depth-to-image); 7 with classes = latents + the low-resolution image, the noise level as the
# class (the SD x4 upscaler); 7 without = latents + a colour layout (sdtorch's layout models).
CONCAT: dict[tuple[int, bool], str] = {(4, False): "", (9, False): "inpainting", (8, False): "instruct-pix2pix",
                                       (5, False): "depth", (7, True): "x4-upscaler", (7, False): "layout"}

# What a kind's single files cannot tell from their keys (the x4 upscaler: Stability's
# x4-upscaling.yaml: 8 heads, linear betas 1e-4..0.02 on the scaled_linear curve, v-prediction,
# latent scale 0.08333, 128-pixel inputs made 512); detection fills these in.
KIND_FACTS: dict[str, dict] = {
    "x4-upscaler": {"num_heads": 8, "beta_start": 0.0001, "beta_end": 0.02, "prediction": "v", "latent_scale": 0.08333,
                    "sample_size": 512},
}


def kind_of(in_channels: int, classes: bool) -> str:
    """"" for a plain UNet, else its image conditioning (`CONCAT`); unknown channel counts are errors."""
    if (in_channels, classes) not in CONCAT:
        known = ", ".join(str(c) for c, _ in CONCAT)
        raise ValueError(f"a UNet with {in_channels} input channels{' and class labels' if classes else ''} is not "
                         f"a known kind (known channel counts: {known})")
    return CONCAT[in_channels, classes]


def concat_kind(cfg: ModelConfig) -> str:
    return kind_of(cfg.unet.in_channels, bool(cfg.unet.num_classes))


def describe(cfg: ModelConfig) -> str:
    """A one-line name for what a config is: 'SD 1.x', 'SD 2.x inpainting', 'custom (emoji)'."""
    family = family_of(cfg)
    label = family.label
    kind = concat_kind(cfg)
    other_width = cfg.unet.model_channels != family.model_channels and kind not in KIND_FACTS
    if cfg.unet.context_dim != family.context_dim or other_width:
        label = f"custom ({cfg.name})"
    return f"{label} {kind}".strip()
