"""`--from-png FILE`: a PNG's A1111 infotext as command-line defaults (flags given explicitly
win), and `--style` names applied from a styles.csv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from sdtorch.conditioning.styles import apply_styles, read_styles
from sdtorch.generate.infotext import parse_infotext
from sdtorch.sampling import samplers

# infotext field -> (argument dest, its flags, type)
FIELDS = {
    "Prompt": ("prompt", (), str),
    "Negative prompt": ("negative", ("--negative",), str),
    "Steps": ("steps", ("--steps",), int),
    "CFG scale": ("cfg", ("--cfg",), float),
    "Seed": ("seed", ("--seed",), int),
    "Clip skip": ("clip_skip", ("--clip-skip",), int),
    "Eta": ("eta", ("--eta",), float),
    "Denoising strength": ("strength", ("--strength",), float),
    "Variation seed": ("subseed", ("--subseed",), int),
    "Variation seed strength": ("subseed_strength", ("--subseed-strength",), float),
    "Timestep spacing": ("timestep_spacing", ("--timestep-spacing",), str),
}
UNSUPPORTED = ("Hires upscale", "Hires steps", "Hires resize-1")


def given(argv: list[str], flags: tuple[str, ...]) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def read_infotext(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PNG not found: {path}")
    text = Image.open(path).info.get("parameters")
    if not text:
        raise ValueError(f"{path} carries no A1111 'parameters' text")
    return parse_infotext(text)


def apply_infotext(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill `args` from args.from_png's infotext where the command line did not set a value."""
    fields = read_infotext(args.from_png)
    for key in UNSUPPORTED:
        if key in fields:
            print(f"sdtorch: warning: {args.from_png}: {key!r} is not reproduced", file=sys.stderr)
    for key, (dest, flags, kind) in FIELDS.items():
        if key not in fields or not hasattr(args, dest):
            continue
        if dest == "prompt" and args.prompt is not None:
            continue
        if flags and given(argv, flags):
            continue
        setattr(args, dest, kind(fields[key]))
    if "Sampler" in fields and not given(argv, ("--sampler", "--scheduler")):
        args.sampler, args.scheduler = samplers.from_a1111(fields["Sampler"], fields.get("Schedule type"))
    if fields.get("Tiling") == "True" and not given(argv, ("--tiling",)):
        args.tiling = True
    if "Size" in fields and hasattr(args, "width") and not given(argv, ("--width", "--height")):
        args.width, args.height = (int(v) for v in fields["Size"].split("x"))


def apply_style_options(args: argparse.Namespace) -> None:
    if not getattr(args, "style", None):
        return
    if not args.styles_file:
        raise ValueError("--style needs --styles-file (A1111's styles.csv)")
    args.prompt, args.negative = apply_styles(args.prompt, args.negative, args.style, read_styles(args.styles_file))
