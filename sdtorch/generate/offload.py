"""Low memory (`sdtorch.load(path, low_memory=True)`, `--low-memory`): weights stay in their file
until a run needs them, and the text encoders go back to it once the prompts are encoded.

A run's peak is then the UNet and the VAE plus activations, never the UNet and the text encoders
together: the first run reads the text encoders, encodes, frees them, and only then reads the
UNet (a later run reads the text encoders again, beside the UNet). glibc's malloc keeps freed
blocks of up to 32 MB in its heap, so the memory of the freed text encoders (and of the sampler's
activations, before the decode) is handed back to the system with malloc_trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

import torch

from sdtorch.adapters.fast import fast_layout
from sdtorch.config import ModelConfig
from sdtorch.formats import checkpoint

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text")


class Offload:
    """A low-memory pipeline's single file, read part by part ("unet" or "text") into its modules."""

    def __init__(self, path: Path, config: ModelConfig, dtype: torch.dtype, fast: bool):
        self.path, self.config, self.dtype, self.fast = path, config, dtype, fast

    def read(self, pipe, part: str) -> None:
        log.info("reading the %s weights of %s", part, self.path)
        ckpt = checkpoint.read(self.path, config=self.config, prediction=self.config.prediction,
                               lazy=tuple(p for p in PARTS if p != part))
        if part == "unet":
            targets = [(pipe.unet, ckpt.unet, "UNet")]
        else:
            targets = [(pipe.clip, ckpt.clip, "text encoder"), (pipe.clip2, ckpt.clip2, "second text encoder")]
        device = pipe.device
        for module, sd, what in targets:
            if module is not None:
                checkpoint.load_strict(module, sd, what, self.dtype, consume=True)
                module.to(device)
        if part == "unet" and self.fast:
            fast_layout(pipe.unet)


def is_meta(module: torch.nn.Module) -> bool:
    return next(module.parameters()).is_meta


def text_needed(pipe) -> None:
    """Before encoding: text encoders freed by an earlier run are read again from the file."""
    if not is_meta(pipe.clip):
        return
    if pipe.offload is None:
        raise RuntimeError("this pipeline's text encoders were freed after encoding (low_memory) and it has no "
                           "single file to read them from again; load it again")
    pipe.offload.read(pipe, "text")


def text_encoded(pipe) -> None:
    """After encoding: a low-memory pipeline frees its text encoders, then reads its UNet if it has not yet."""
    if not pipe.low_memory:
        return
    for clip in pipe.text_encoders:
        clip.to_empty(device="meta")  # the weights released, the modules (and their hooks) kept
    release_memory()
    unet_needed(pipe)


def unet_needed(pipe) -> None:
    if pipe.offload is not None and is_meta(pipe.unet):
        pipe.offload.read(pipe, "unet")


def release_memory() -> None:
    """Hand the free pages of malloc's heap back to the system (glibc only; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
