"""What a command line reads from files besides the model: the init image and mask (or an
outpainting canvas), a depth map, a layout, a condition encoder's input tensor."""

from __future__ import annotations

import argparse


def images(args: argparse.Namespace):
    """(init image, mask) of an img2img / inpaint / upscale command ((None, None) for generate)."""
    from sdtorch.generate.images import extend_canvas, open_image

    init = mask = None
    if args.command != "generate":
        init = open_image(args.image)
    if args.command == "inpaint":
        if bool(args.mask) == bool(args.extend):
            raise ValueError("inpaint needs exactly one of --mask (inpainting) or --extend (outpainting)")
        if args.mask:
            mask = open_image(args.mask, "L")
        else:
            try:
                left, right, top, bottom = (int(v) for v in args.extend.split(","))
            except ValueError:
                raise ValueError(f"--extend takes four integers L,R,T,B, got {args.extend!r}") from None
            init, mask = extend_canvas(init, left=left, right=right, top=top, bottom=bottom)
    return init, mask


def depth(path: str | None):
    """A depth map from an image file (its grey levels, 8 or 16 bits) or a .npy / .pt / .safetensors tensor."""
    from sdtorch.generate.images import open_image

    if path is None:
        return None
    return condition(path) if path.endswith((".npy", ".pt", ".safetensors")) else open_image(path, "F")


def condition(path: str | None):
    """A condition encoder's input from a .npy / .pt / .safetensors file (its single tensor)."""
    from sdtorch.formats.files import read_tensor

    return None if path is None else read_tensor(path).float()


def layout(path: str | None):
    """A layout picture, as it is (transparency is made white when it is read)."""
    from sdtorch.generate.images import open_image

    return None if path is None else open_image(path, "RGBA")
