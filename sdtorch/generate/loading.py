"""`sdtorch.load`: a checkpoint (or the built-in model) to a ready `Pipeline`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sdtorch.adapters.fast import fast_layout
from sdtorch.config import ModelConfig, Prediction
from sdtorch.families import describe
from sdtorch.formats import checkpoint
from sdtorch.generate.offload import Offload
from sdtorch.generate.pipeline import Pipeline
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.taesd import TinyDecoder, config_from_keys, taesd_keys
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BUILTIN = Path(__file__).parents[1] / "data" / "emoji.safetensors"
# The built-in layout model (semantic synthesis, `scripts/train_layout.py`): a UNet for BUILTIN's VAE and text encoder.
BUILTIN_LAYOUT = BUILTIN.with_name("emoji_layout.safetensors")

# The built-in model's tiny decoder (`scripts/train_tiny_decoder.py`, TAESD's design for its 4x VAE).
BUILTIN_TINY = BUILTIN.with_name("emoji_taesd.safetensors")

# where `--compile openvino` keeps converted UNet graphs (per model hash and shape)
OPENVINO_CACHE = Path(os.environ.get("SDTORCH_CACHE", Path.home() / ".cache" / "sdtorch")) / "openvino"


def load(path: str | Path | None = None, *, config: ModelConfig | None = None,
         prediction: Prediction | None = None, dtype: torch.dtype | str = torch.float32,
         device: str | torch.device = "cpu", compile: bool | str = False, low_memory: bool = False) -> Pipeline:
    """Load a single-file checkpoint (.safetensors / .ckpt) or a diffusers folder; with no path,
    the built-in emoji model shipped in the package (64x64, trained by `scripts/train_builtin.sh`).

    The model is detected from the keys and shapes unless `config` is given; the prediction type
    (eps / v) can be given, else it is read from the file's metadata or guessed (and logged).
    In bfloat16/float16 on the CPU the UNet and VAE use channels-last weights; `compile` runs the
    UNet through torch.compile (`Pipeline.compile`). low_memory: the text encoders are freed once
    the prompts are encoded and, for a single file, the UNet is read only after that (and the text
    encoders again when needed), so they are never in memory together (`sdtorch.generate.offload`).
    """
    if path is None:
        if not BUILTIN.exists():
            raise FileNotFoundError(f"the built-in model {BUILTIN} is missing from this installation; "
                                    "reinstall sdtorch or pass a checkpoint")
        path = BUILTIN
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    lazy = ("unet",) if low_memory and Path(path).is_file() else ()
    ckpt = checkpoint.read(path, config=config, prediction=prediction, lazy=lazy)
    cfg = ckpt.config
    log.info("loaded %s: %s, prediction %s (%s)", path, describe(cfg), cfg.prediction, ckpt.prediction_source)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        unet, vae, clip = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), ClipTextModel(cfg.clip)
        clip2 = None if cfg.clip2 is None else ClipTextModel(cfg.clip2)
    checkpoint.load_strict(unet, ckpt.unet, "UNet", dtype, consume=True)
    checkpoint.load_strict(vae, ckpt.vae, "VAE", dtype, consume=True)
    checkpoint.load_strict(clip, ckpt.clip, "text encoder", dtype, consume=True)
    if clip2 is not None:
        checkpoint.load_strict(clip2, ckpt.clip2, "second text encoder", dtype, consume=True)
        clip2 = clip2.to(device)
    elif ckpt.clip2:
        raise checkpoint.CheckpointError(f"{path} has a second text encoder but its config has none (clip2)")
    fast = dtype != torch.float32 and torch.device(device).type == "cpu"
    if fast:
        unet, vae = fast_layout(unet), fast_layout(vae)
    pipe = Pipeline(cfg, unet if lazy else unet.to(device), vae.to(device), clip.to(device),
                    path=Path(path), prediction_source=ckpt.prediction_source, clip2=clip2)
    pipe.low_memory = low_memory
    if lazy:
        pipe.offload = Offload(Path(path), cfg, dtype, fast)
    if ckpt.encoder_spec is not None:
        pipe.condition_encoder = _condition_encoder(ckpt, device)
    if compile:  # True: inductor; or a backend's name (`Pipeline.compile`)
        pipe.compile("inductor" if compile is True else compile, cache_dir=OPENVINO_CACHE)
    return pipe


def _condition_encoder(ckpt, device) -> torch.nn.Module:
    """The condition encoder stored in the file, loaded strictly, in float32 (it is small)."""
    from sdtorch.conditioning.encoders import build

    try:
        encoder = build(ckpt.encoder_spec)
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{ckpt.path}: bad condition-encoder spec in the metadata: {e}") from None
    checkpoint.load_strict(encoder, ckpt.encoder, "condition encoder", torch.float32)
    return encoder.eval().to(device)


def load_tiny_decoder(path: str | Path | None, pipe: Pipeline) -> TinyDecoder:
    """A TAESD-layout decoder file (taesd_decoder.safetensors / .pth, taesdxl_decoder, a diffusers
    AutoencoderTiny file) for `pipe`, checked against its latent space, in its dtype; with no path,
    the built-in model's own (only for the built-in model)."""
    if path is None:
        if pipe.path is None or pipe.path.resolve() != BUILTIN.resolve():
            raise FileNotFoundError("--decoder tiny needs --tiny-decoder PATH for this model (TAESD's "
                                    "taesd_decoder.safetensors for SD 1.x/2.x, taesdxl_decoder.safetensors for SDXL)")
        path = BUILTIN_TINY
    sd, _ = checkpoint.read_state_dict(path)
    sd = taesd_keys(sd)
    try:
        cfg = config_from_keys(sd)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from None
    if cfg.latent_channels != pipe.config.vae.z_channels or 2**cfg.upsamples != pipe.vae.downscale:
        raise checkpoint.CheckpointError(
            f"{path}: a tiny decoder for {cfg.latent_channels}-channel latents upscaling {2**cfg.upsamples}x, but "
            f"this model's latents have {pipe.config.vae.z_channels} channels and its VAE upscales {pipe.vae.downscale}x")
    with torch.device("meta"):
        decoder = TinyDecoder(cfg)
    checkpoint.load_strict(decoder, sd, "tiny decoder", pipe.dtype)
    return decoder.eval().to(pipe.device)
