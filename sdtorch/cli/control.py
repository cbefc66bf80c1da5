"""`--control PATH:IMAGE[:WEIGHT]` on the command line."""

from __future__ import annotations

import argparse


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", action="append", default=[], metavar="PATH:IMAGE[:WEIGHT]",
                   help="a ControlNet file or folder and its control image (repeatable: several add up)")
    p.add_argument("--control-preprocess", default="none", metavar="NAME",
                   help="make the control images with: none, canny, invert, blur_gaussian, tile_resample, "
                        "inpaint (needs a mask)")
    p.add_argument("--control-mask", metavar="MASK", default=None,
                   help="inpaint ControlNets: white = to repaint (default: the inpaint command's --mask)")
    p.add_argument("--control-mode", default="balanced", choices=["balanced", "prompt", "control", "guess"],
                   help="balanced, prompt (my prompt is more important), control (ControlNet is more important), "
                        "guess (diffusers' guess mode)")
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of steps where control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of steps where control ends")


def control_unit(spec: str, pipe, args: argparse.Namespace):
    """--control PATH:IMAGE[:WEIGHT] -> a `ControlUnit` with its ControlNet loaded for this model."""
    from sdtorch.adapters.control import ControlUnit
    from sdtorch.conditioning.preprocess import INPAINT, preprocess
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
    needs_mask = args.control_preprocess in INPAINT
    mask_path = args.control_mask or (getattr(args, "mask", None) if needs_mask else None)
    if needs_mask and not mask_path:
        raise ValueError(f"--control-preprocess {args.control_preprocess} needs --control-mask MASK "
                         "(or the inpaint command's --mask)")
    mask = open_image(mask_path, "L") if mask_path else None
    return ControlUnit(model, image, weight, args.control_start, args.control_end, args.control_mode,
                       module=args.control_preprocess, mask=mask)

