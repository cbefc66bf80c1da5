"""Random-weight reference models (diffusers folders and original single files). Test-only.

`build_reference_folder` writes a diffusers `StableDiffusionPipeline` folder for a preset;
`write_original_checkpoint` turns it into the original (CompVis/LDM) single-file layout with
`sdtorch.formats.diffusers.diffusers_folder_to_original`. diffusers' own `from_single_file` reading that
file back is what holds the converter to the reference (tests/test_convert.py).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from reference_files import write_hf_tokenizer
from safetensors.torch import save_file

from sdtorch.config import ClipConfig, ModelConfig
from sdtorch.formats.diffusers import diffusers_folder_to_original
from sdtorch.formats.diffusers_config import diffusers_configs

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# SDXL folders: base (two text encoders) and refiner (the second only), as diffusers writes them.
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_REFINER_INDEX = SDXL_INDEX | {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True,
    "text_encoder": [None, None],
    "tokenizer": [None, None],
}


@dataclass(frozen=True)
class Reference:
    """A preset's random-weight reference: diffusers folder + original-layout single file."""

    preset: ModelConfig
    folder: Path  # diffusers StableDiffusionPipeline folder
    checkpoint: Path  # original-layout .safetensors written from `folder`


def build_reference_folder(preset: ModelConfig, folder: str | Path, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write a loadable diffusers `StableDiffusionPipeline` folder with random weights (stored
    in `dtype`: float16 as the real SDXL files are).

    Components are built from `diffusers_configs(preset)` one at a time (seeded with
    `seed + k` right before each constructor: unet 0, vae 1, text_encoder 2) and freed after
    saving, so a full-size preset never holds more than one model in memory. The scheduler is
    SD's PNDM default (v_prediction for v models); no safety checker.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    cfgs = diffusers_configs(preset)
    builders = {
        "unet": lambda: UNet2DConditionModel(**cfgs["unet"]),
        "vae": lambda: AutoencoderKL(**cfgs["vae"]),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in cfgs:
            cls = CLIPTextModelWithProjection if "projection_dim" in cfgs[name] else CLIPTextModel
            builders[name] = lambda cls=cls, name=name: cls(CLIPTextConfig(**cfgs[name]))
    for k, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + k)
        model = build().to(dtype)
        model.save_pretrained(folder / name)
        del model
        gc.collect()
    sdxl = preset.clip_layout.startswith("sdxl")
    scheduler = EulerDiscreteScheduler if sdxl else PNDMScheduler
    scheduler.from_config(cfgs["scheduler"]).save_pretrained(folder / "scheduler")
    for name, clip in (("text_encoder", preset.clip), ("text_encoder_2", preset.clip2 or preset.clip)):
        if name in cfgs:
            write_hf_tokenizer(folder / name.replace("text_encoder", "tokenizer"),
                               pad_token="!" if clip.pad_token_id == 0 else "<|endoftext|>")
    import diffusers

    index = {"sdxl": SDXL_INDEX, "sdxl-refiner": SDXL_REFINER_INDEX}.get(preset.clip_layout, MODEL_INDEX)
    index = index | {"_diffusers_version": diffusers.__version__}  # the inpainting loader reads it
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def openclip_unused_shapes(clip: ClipConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the OpenCLIP tensors a real SD2 file has but SD never uses (no prefix):
    the last resblock (`layer`: 23 for ViT-H, since SD2 conditions on the penultimate layer's
    output), `text_projection` (W, W) and the scalar `logit_scale`."""
    w, h = clip.width, clip.width * clip.mlp_ratio
    block = {
        "ln_1.weight": (w,),
        "ln_1.bias": (w,),
        "attn.in_proj_weight": (3 * w, w),
        "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w),
        "attn.out_proj.bias": (w,),
        "ln_2.weight": (w,),
        "ln_2.bias": (w,),
        "mlp.c_fc.weight": (h, w),
        "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (w, h),
        "mlp.c_proj.bias": (w,),
    }
    shapes = {f"transformer.resblocks.{layer}.{k}": s for k, s in block.items()}
    return shapes | {"text_projection": (w, w), "logit_scale": ()}


def write_original_checkpoint(
    folder: str | Path, path: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the original-layout single file of a diffusers folder (.safetensors, or a
    `torch.save({"state_dict": ...})` pickle when `path` ends in .ckpt).

    For OpenCLIP models (SD2) the file gets the real layout: diffusers keeps 23 of ViT-H's 24
    resblocks, so a random 24th resblock (unused: SD2 reads the penultimate layer), a random
    `text_projection` (W, W) and `logit_scale` = ln(100) (OpenCLIP's trained value) are added.
    No `position_ids` and no `model_ema.*` keys are written.
    """
    path = Path(path)
    sd, cfg = diffusers_folder_to_original(folder)
    if cfg.clip_layout.startswith("sdxl"):  # OpenCLIP bigG's contrastive temperature, unused
        sd[f"conditioner.embedders.{0 if cfg.clip2 is None else 1}.model.logit_scale"] = torch.tensor(math.log(100.0))
    if cfg.clip_layout == "openclip":
        g = torch.Generator().manual_seed(1234)
        for name, shape in openclip_unused_shapes(cfg.clip, cfg.clip.layers).items():
            value = torch.randn(shape, generator=g) * 0.02 if shape else torch.tensor(math.log(100.0))
            sd[f"cond_stage_model.model.{name}"] = value
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, path)
    del sd
    gc.collect()
    return path


def build_reference(preset: ModelConfig, root: str | Path, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Reference:
    """`build_reference_folder` + `write_original_checkpoint` under `root`, both stored in `dtype`."""
    root = Path(root)
    folder = build_reference_folder(preset, root / "diffusers", seed=seed, dtype=dtype)
    return Reference(preset, folder, write_original_checkpoint(folder, root / f"{preset.name}.safetensors", dtype))


def key_lines(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Sorted `name<TAB>shape` lines (shape `320,4,3,3`; empty for a scalar)."""
    return [f"{k}\t{','.join(map(str, s))}" for k, s in sorted(shapes.items())]


def read_key_list(path: str | Path) -> list[str]:
    """The `name<TAB>shape` lines of a tests/data/keys_*.txt file, '#' comment lines skipped."""
    lines = Path(path).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


# sdtorch sampler -> (diffusers scheduler class, options for from_config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_a_karras": ("EulerAncestralDiscreteScheduler", {}),  # grid installed by reference_scheduler
    "lcm": ("LCMScheduler", {}),
}
SCHEDULERS.update({f"{k}_karras": (SCHEDULERS[k][0], {"use_karras_sigmas": True})
                   for k in ("euler", "heun", "lms", "dpmpp_2m", "unipc")})


def reference_scheduler(sampler: str, config: dict):
    """The diffusers scheduler matching sdtorch sampler `sampler`, built `from_config(config)`.

    EulerAncestralDiscreteScheduler has no Karras option: for "euler_a_karras" its
    `set_timesteps` also installs the grid EulerDiscreteScheduler(use_karras_sigmas=True) builds.
    """
    import diffusers

    cls_name, options = SCHEDULERS[sampler]
    # A config read off a previously swapped-in scheduler carries that one's options: drop them.
    config = {k: v for k, v in dict(config).items() if k != "use_karras_sigmas"}
    scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    if sampler == "euler_a_karras":
        karras = diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
        set_timesteps = scheduler.set_timesteps

        def set_karras(n, device=None, **kw):
            set_timesteps(n, device=device, **kw)
            karras.set_timesteps(n, device=device)
            scheduler.sigmas, scheduler.timesteps = karras.sigmas, karras.timesteps

        scheduler.set_timesteps = set_karras
    return scheduler
