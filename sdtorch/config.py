"""Model configurations as frozen dataclasses, and the presets of the real checkpoints.

Field names follow the original (CompVis / Stability) YAML configs where one exists, so a
reader can hold a preset next to `v1-inference.yaml` or `v2-inference-v.yaml`.
Vary a preset with `dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class ClipConfig:
    """CLIP text transformer (HF `CLIPTextModel` naming; OpenCLIP files are converted on load)."""

    vocab_size: int = 49408
    max_length: int = 77  # context length: <start> + 75 tokens + <end>
    width: int = 768  # hidden size
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4  # intermediate size = mlp_ratio * width
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP ViT-H: gelu
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 49407  # SD1 pads with <end>; SD2 (OpenCLIP tokenizer) pads with "!" = 0
    # Which hidden state conditions the UNet, counted from the end as in A1111's "clip skip":
    # 1 = last layer (SD1), 2 = penultimate (SD2). The final layer norm is applied either way.
    clip_skip: int = 1


@dataclass(frozen=True)
class UNetConfig:
    """`ldm.modules.diffusionmodules.openaimodel.UNetModel` parameters."""

    in_channels: int = 4  # 9 for inpainting UNets (latents, mask, masked-image latents)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get attention
    num_heads: int = 8  # SD1: fixed head count
    num_head_channels: int = -1  # SD2: fixed head width (64); -1 = use num_heads
    transformer_depth: int = 1
    context_dim: int = 768  # text-encoder width
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 Conv
    norm_groups: int = 32
    dropout: float = 0.0


@dataclass(frozen=True)
class VAEConfig:
    """`ldm.models.autoencoder.AutoencoderKL` `ddconfig` plus the latent scale."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    # Latents are multiplied by this before diffusion so that they have roughly unit variance
    # (measured by the SD authors on their training set; 0.18215 for SD 1.x and 2.x).
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (diffusers `scheduler_config.json` names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    timestep_spacing: Literal["leading", "linspace", "trailing"] = "leading"
    steps_offset: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a text-to-image model."""

    name: str
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "eps"
    clip_layout: Literal["hf", "openclip"] = "hf"  # how the text encoder is stored on disk
    sample_size: int = 512  # native image size in pixels

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        def tup(sub: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}

        return ModelConfig(
            name=d["name"],
            clip=ClipConfig(**tup(d["clip"])),
            unet=UNetConfig(**tup(d["unet"])),
            vae=VAEConfig(**tup(d["vae"])),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction=d["prediction"],
            clip_layout=d["clip_layout"],
            sample_size=d["sample_size"],
        )


SD15 = ModelConfig(name="sd15")

SD21_CLIP = ClipConfig(
    width=1024, layers=24, heads=16, act="gelu", pad_token_id=0, clip_skip=2
)
SD21_UNET = UNetConfig(
    num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
)
SD21 = ModelConfig(  # 768x768 v-prediction (stable-diffusion-2-1)
    name="sd21",
    clip=SD21_CLIP,
    unet=SD21_UNET,
    prediction="v",
    clip_layout="openclip",
    sample_size=768,
)
SD21_BASE = ModelConfig(  # 512x512 eps-prediction (stable-diffusion-2-1-base)
    name="sd21-base", clip=SD21_CLIP, unet=SD21_UNET, clip_layout="openclip"
)

# A model small enough for unit tests: every architectural feature, seconds per run.
TINY = ModelConfig(
    name="tiny",
    clip=ClipConfig(width=32, layers=2, heads=2),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    sample_size=64,
)

# The built-in model's architecture: 64x64 images, 16x16x4 latents (f = 4), a 4-layer CLIP text
# tower of width 128 with the real tokenizer. 25.9 M parameters: 51.8 MB in fp16; a guided batch of
# 4 in 20 steps takes about 2.2 s on a 2-core CPU.
EMOJI = ModelConfig(
    name="emoji",
    clip=ClipConfig(width=128, layers=4, heads=2),
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 3),
        num_res_blocks=2,
        attention_resolutions=(2, 4),
        num_heads=-1,
        num_head_channels=32,
        context_dim=128,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=16),
    sample_size=64,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD21, SD21_BASE, TINY, EMOJI)}
