"""Model configurations as frozen dataclasses, and the presets of the real checkpoints.

Field names follow the original (CompVis / Stability) YAML configs where one exists, so a
reader can hold a preset next to `v1-inference.yaml` or `v2-inference-v.yaml`.
Vary a preset with `dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
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
    # 1 = last layer (SD1), 2 = penultimate (SD2, SDXL).
    clip_skip: int = 1
    # Whether the final layer norm is applied to that hidden state: SD1/SD2 (and A1111's clip skip)
    # do; SDXL conditions on the penultimate layer's raw output.
    final_norm: bool = True
    # Width of `text_projection` (pooled output, SDXL's OpenCLIP bigG: 1280); 0 = none.
    projection_dim: int = 0


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
    transformer_depth: int | tuple[int, ...] = 1  # per level (SDXL: 1, 2, 10); the middle block takes the last
    context_dim: int = 768  # text-encoder width (SDXL: both encoders' widths concatenated)
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 Conv
    norm_groups: int = 32
    dropout: float = 0.0
    # Width of the added vector embedding `label_emb` (SGM's `adm_in_channels`, `num_classes:
    # sequential`): SDXL's pooled text + Fourier features of its size conditions; 0 = none.
    adm_in_channels: int = 0
    # A class-label embedding `label_emb` (nn.Embedding, LDM's integer `num_classes`): the x4
    # upscaler's noise level 0..num_classes-1; 0 = none.
    num_classes: int = 0
    # Per level: attn1 attends to the context instead of the pixels (LDM's disable_self_attentions,
    # diffusers' only_cross_attention; the x4 upscaler's: True, True, True, False); () = none.
    disable_self_attentions: tuple[bool, ...] = ()

    def cross_only(self, level: int) -> bool:
        """Whether attn1 at `level` (-1: the middle block, which keeps self-attention) attends to the context."""
        return level >= 0 and bool(self.disable_self_attentions) and self.disable_self_attentions[level]

    def depth(self, level: int) -> int:
        """Transformer blocks per attention layer at `level` (-1: the middle block)."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]


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
    # How the text encoders are stored in single files (the family, `sdtorch.families`).
    clip_layout: Literal["hf", "openclip", "sdxl", "sdxl-refiner"] = "hf"
    sample_size: int = 512  # native image size in pixels
    clip2: ClipConfig | None = None  # a second text encoder (SDXL: OpenCLIP bigG beside CLIP ViT-L)
    # SDXL's micro-conditioning: what follows the pooled text in the UNet's vector, each value
    # embedded by `micro_dim` Fourier features ("original_size", "crop", "target_size" or
    # "aesthetic_score"; sizes are (h, w) pairs).
    micro: tuple[str, ...] = ()
    micro_dim: int = 256

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
            clip2=ClipConfig(**tup(d["clip2"])) if d.get("clip2") else None,  # absent in older files
            micro=tuple(d.get("micro", ())),
            micro_dim=d.get("micro_dim", 256),
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
SD_X4_UPSCALER = ModelConfig(  # stable-diffusion-x4-upscaler (Stability's x4-upscaling.yaml)
    name="sd-x4-upscaler",
    clip=SD21_CLIP,
    unet=UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_resolutions=(8, 4, 2),
                    num_heads=8, context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
                    disable_self_attentions=(True, True, True, False)),
    vae=VAEConfig(ch_mult=(1, 2, 4), scaling_factor=0.08333),
    schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
    prediction="v",
    clip_layout="openclip",
    sample_size=512,
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

# SDXL (sd_xl_base.yaml / sd_xl_refiner.yaml; diffusers' stable-diffusion-xl-base-1.0 configs).
SDXL_CLIP_L = ClipConfig(clip_skip=2, final_norm=False)  # CLIP ViT-L/14, penultimate layer, no final norm
SDXL_CLIP_G = ClipConfig(  # OpenCLIP ViT-bigG/14: penultimate layer, pooled output through text_projection
    width=1280, layers=32, heads=20, act="gelu", pad_token_id=0, clip_skip=2, final_norm=False, projection_dim=1280
)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SDXL_SCHEDULE = ScheduleConfig()  # EulerDiscrete in diffusers; the same training betas as SD 1/2
SDXL = ModelConfig(
    name="sdxl",
    clip=SDXL_CLIP_L,
    clip2=SDXL_CLIP_G,
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        num_heads=-1,
        num_head_channels=64,
        transformer_depth=(1, 2, 10),
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,  # 1280 pooled + 6 x 256
    ),
    vae=SDXL_VAE,
    clip_layout="sdxl",
    sample_size=1024,
    micro=("original_size", "crop", "target_size"),
)
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner",
    clip=SDXL_CLIP_G,
    unet=replace(SDXL.unet, model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=4, context_dim=1280,
                 adm_in_channels=2560),  # 1280 pooled + 5 x 256
    vae=SDXL_VAE,
    clip_layout="sdxl-refiner",
    sample_size=1024,
    micro=("original_size", "crop", "aesthetic_score"),
)

# SDXL in miniature (3 levels, transformer depth varying per level, two text encoders of width 32;
# the second has 10 layers, as diffusers' single-file loader recognises SDXL by `resblocks.9`).
TINY_XL = ModelConfig(
    name="tiny-xl",
    clip=replace(TINY.clip, layers=3, clip_skip=2, final_norm=False),
    clip2=replace(TINY.clip, layers=10, act="gelu", pad_token_id=0, clip_skip=2, final_norm=False, projection_dim=32),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(4, 2),
        num_heads=-1,
        num_head_channels=16,
        transformer_depth=(1, 1, 2),
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=8,
        adm_in_channels=32 + 6 * 8,
    ),
    vae=replace(TINY.vae, scaling_factor=0.13025),
    clip_layout="sdxl",
    sample_size=64,
    micro=("original_size", "crop", "target_size"),
    micro_dim=8,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD21, SD21_BASE, TINY, EMOJI, SDXL, SDXL_REFINER)}
