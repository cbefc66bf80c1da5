"""Seamless tiling (A1111's `tiling`): every padded convolution of the UNet and the VAE pads
circularly, so the image wraps around at its edges and tiles without seams. Applied for the
length of a run (`seamless(...)` restores the padding modes afterwards)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def seamless(*models: nn.Module, enabled: bool = True):
    convs = [m for model in models for m in model.modules()
             if isinstance(m, nn.Conv2d) and any(p > 0 for p in _pairs(m.padding))] if enabled else []
    saved = [m.padding_mode for m in convs]
    try:
        for m in convs:
            m.padding_mode = "circular"
        yield
    finally:
        for m, mode in zip(convs, saved):
            m.padding_mode = mode


def _pairs(padding) -> tuple:
    return padding if isinstance(padding, tuple) else (0,) if isinstance(padding, str) else (padding,)
