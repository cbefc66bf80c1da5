"""`--control PATH:IMAGE[:WEIGHT]` on the command line."""

from __future__ import annotations

import argparse


def control_unit(spec: str, pipe, args: argparse.Namespace):
    """--control PATH:IMAGE[:WEIGHT] -> a `ControlUnit` with its ControlNet loaded for this model."""
    from sdtorch.adapters.control import ControlUnit
    from sdtorch.conditioning.preprocess import preprocess
    from sdtorch.formats import controlnet
    from sdtorch.generate.images import open_image

    parts = spec.split(":")
    weight = 1.0
    if len(parts) >= 3:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    if len(parts) != 2:
        raise ValueError(f"--control takes PATH:IMAGE[:WEIGHT], got {spec!r}")
    model = controlnet.load(parts[0], pipe.config.unet, dtype=pipe.dtype, device=pipe.device)
    image = preprocess(args.control_preprocess, open_image(parts[1]))
    return ControlUnit(model, image, weight, args.control_start, args.control_end, args.control_mode,
                       module=args.control_preprocess)

