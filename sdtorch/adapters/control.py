"""ControlNet units applied per request: a wrapper around the UNet call that adds the ControlNets'
residuals to the skip connections and the middle block (the loaded UNet is not touched).

Each unit has a weight, a guidance window (the fraction of steps it acts in: step i of n is
controlled when start <= i / n and (i + 1) / n <= end, as diffusers counts it) and a control mode:
"balanced" (every residual times the weight), "prompt" (AUTOMATIC1111's "My prompt is more
important": residual k of 13 times 0.825^(12 - k)), "control" ("ControlNet is more important": those
soft weights, on the conditional half of a guided batch only) and "guess" (diffusers' guess_mode:
weights from 0.1 to 1 on a log scale, conditional half only). Several units' residuals add up.
Inpaint ControlNets (control_v11p_sd15_inpaint) take a unit with a mask: the control image with
-1 where the mask is white (> 0.5), as they were trained (diffusers' make_inpaint_condition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",  # mode -> A1111's label
         "control": "ControlNet is more important", "guess": "Guess Mode"}
RESIZE_MODES = {"crop": "Crop and Resize", "just": "Just Resize", "fill": "Resize and Fill"}


@dataclass(frozen=True)
class ControlUnit:
    """model: a loaded `sdtorch.models.controlnet.ControlNet`; image: the control image (PIL, or a
    (1 or B, C, H, W) tensor in [0, 1]), resized to the output per `resize`; module: the
    preprocessor that made the image (for the infotext); mask (inpaint ControlNets; PIL or a
    (1, 1, H, W) tensor in [0, 1]): white = to repaint, marked -1 in the control image."""

    model: Any
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "crop"
    module: str = "none"
    mask: Any = None

    def validate(self) -> None:
        if self.module.startswith("inpaint") and self.mask is None:
            raise ValueError(f"the {self.module} module needs a mask (white = to repaint)")
        if self.mode not in MODES:
            raise ValueError(f"control mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"the guidance window needs 0 <= start < end <= 1, got {self.start}..{self.end}")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool):
            raise ValueError(f"a control weight must be a number, got {self.weight!r}")

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def scales(self, n: int) -> list[float]:
        if self.mode == "balanced":
            return [self.weight] * n
        if self.mode == "guess":
            return (torch.logspace(-1, 0, n) * self.weight).tolist()
        return [self.weight * 0.825 ** float(12 - k) for k in range(n)]  # SDXL: the first 10 of 13

    @property
    def cond_only(self) -> bool:
        return self.mode in ("control", "guess")

    def infotext(self) -> str:
        """sd-webui-controlnet's infotext of a unit ("Module: canny, Model: name [hash], ...")."""
        fields = {"Module": self.module, "Model": getattr(self.model, "title", "") or "ControlNet",
                  "Weight": self.weight, "Resize Mode": RESIZE_MODES[self.resize], "Guidance Start": self.start,
                  "Guidance End": self.end, "Control Mode": MODES[self.mode]}
        return ", ".join(f"{k}: {v}" for k, v in fields.items())


def control_image(image, width: int, height: int, resize: str = "crop") -> torch.Tensor:
    """A PIL image or a (1 or B, C, H, W) tensor in [0, 1] -> (1 or B, C, height, width) in [0, 1]:
    "just" stretches, "crop" scales to cover and crops the middle, "fill" scales to fit and pads
    with black."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    image = image.float()
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if resize == "just":
        return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    scale = (max if resize == "crop" else min)(width / w, height / h)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if resize == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return image[..., top : top + height, left : left + width]
    top, left = (height - nh) // 2, (width - nw) // 2
    return F.pad(image, (left, width - nw - left, top, height - nh - top))


def control_hint(unit: ControlUnit, width: int, height: int) -> torch.Tensor:
    """The unit's control image at the output size; with a mask (resized the same way), -1 where it
    is above 0.5."""
    hint = control_image(unit.image, width, height, unit.resize)
    if unit.mask is None:
        return hint
    mask = control_image(unit.mask, width, height, unit.resize)[:, :1]
    return hint.masked_fill(mask > 0.5, -1.0)


class ControlledUNet:
    """unet(x, t, context[, y]) with the units' residuals added. `timesteps`: the UNet timestep of
    each sampler step of this run (decreasing), so that a call's step is found from its t (a
    second-order sampler's intermediate calls belong to the step they are inside)."""

    def __init__(self, unet, units: list[tuple[ControlUnit, torch.Tensor]], timesteps: torch.Tensor, batch: int):
        self.unet, self.timesteps, self.batch = unet, timesteps.tolist(), batch
        self.units = [(unit, hint.expand(batch, -1, -1, -1) if hint.shape[0] == 1 else hint) for unit, hint in units]
        self._hints: dict[tuple[int, int], torch.Tensor] = {}  # (unit, rows) -> the hint batch

    def step(self, t: torch.Tensor) -> int:
        """The sampler step whose timestep interval holds t (one scalar read per UNet call)."""
        t0 = float(t.reshape(-1)[0])
        return max(0, sum(ts >= t0 - 1e-3 for ts in self.timesteps) - 1)

    def hint(self, i: int, rows: int) -> torch.Tensor:
        """Unit i's control image repeated to `rows` (a multiple of the batch), made once per run."""
        if (i, rows) not in self._hints:
            self._hints[i, rows] = self.units[i][1].repeat(rows // self.batch, 1, 1, 1)
        return self._hints[i, rows]

    def residuals(self, x, t, context, y) -> list[torch.Tensor] | None:
        step, n = self.step(t), len(self.timesteps)
        total = None
        for i, (unit, _) in enumerate(self.units):
            if not unit.active(step, n):
                continue
            rows = slice(self.batch, None) if unit.cond_only and x.shape[0] > self.batch else slice(None)
            xs, ts, cs = x[rows], t.reshape(-1).expand(x.shape[0])[rows], context[rows]
            ys = None if y is None else y[rows]
            out = unit.model(xs[:, : unit.model.cfg.unet.in_channels], self.hint(i, xs.shape[0]), ts, cs, ys)
            out = [r * s for r, s in zip(out, unit.scales(len(out)))]
            if rows.start:  # the unconditional rows get no control
                out = [torch.cat([r.new_zeros((rows.start, *r.shape[1:])), r]) for r in out]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return total

    def __call__(self, x, t, context, y=None):
        res = self.residuals(x, t, context, y)
        if res is None:
            return self.unet(x, t, context) if y is None else self.unet(x, t, context, y)
        return with_residuals(self.unet, res, x, t, context, y)


def with_residuals(unet, res: list[torch.Tensor], x, t, context, y=None) -> torch.Tensor:
    """The UNet's output with ControlNet residuals added to its skip connections and, the last one,
    to its middle block's output."""
    emb = unet.embed(t, x.shape[0], y)
    dtype = emb.dtype
    h, context = x.to(dtype), context.to(dtype)
    h, skips = unet.encode(h, emb, context)
    skips = [s + r.to(dtype) for s, r in zip(skips, res)]
    h = unet.middle_block(h, emb, context) + res[-1].to(dtype)
    return unet.out(unet.decode(h, skips, emb, context))
