"""Initial and per-step noise: diffusers' batch noise, AUTOMATIC1111's per-image noise, and
variation seeds.

- "diffusers" (the reference's): one CPU generator seeded with the seed draws the whole batch's
  initial noise in one call, then every per-step noise draw of the stochastic samplers.
- "a1111" (AUTOMATIC1111's ImageRNG): image i has its own generator seeded with seed + i; its
  initial noise is that generator's first draw, its per-step noise that generator's next ones.
- Variation seeds (both modes): the noise is slerp(subseed_strength, noise, subnoise), subnoise
  drawn from the subseed (A1111's slerp, normalising along the latent height as it does); with
  seed_resize_from (a1111 mode) the seed's noise is drawn at that size and pasted into the middle.
For one image without variation both modes draw the same initial noise.
"""

from __future__ import annotations

import torch

SEED_MODES = ("diffusers", "a1111")


def image_seeds(seed: int, n: int, mode: str) -> list[int]:
    """The seeds of a batch's n images: all `seed` in diffusers mode (one generator), seed + i in a1111's."""
    return [seed + i if mode == "a1111" else seed for i in range(n)]


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two (C, H, W) noises (its code's normalisation axis)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _randn(seed: int, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    generator = generator or torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class ImageNoise:
    """Per-image generators (A1111's ImageRNG). The samplers draw from it like from a generator
    (`randn_like`), one draw per image and step."""

    device = torch.device("cpu")

    def __init__(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, resize_from: tuple[int, int] = (0, 0), downscale: int = 8):
        self.shape, self.seeds, self.subseeds, self.strength = tuple(shape), seeds, subseeds, subseed_strength
        self.resize_from, self.downscale = resize_from, downscale
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def first(self) -> torch.Tensor:
        w, h = self.resize_from
        noise_shape = self.shape if w <= 0 or h <= 0 else (self.shape[0], h // self.downscale, w // self.downscale)
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            sub = None
            if self.subseeds is not None and self.strength != 0:
                sub = _randn(self.subseeds[i] if i < len(self.subseeds) else 0, noise_shape)
            noise = _randn(seed, noise_shape) if noise_shape != self.shape else _randn(seed, self.shape, generator)
            if sub is not None:
                noise = slerp(self.strength, noise, sub)
            if noise_shape != self.shape:
                noise = _paste_centre(_randn(seed, self.shape, generator), noise)
            xs.append(noise)
        return torch.stack(xs)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]).to(x)


def _paste_centre(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    dx, dy = (x.shape[2] - noise.shape[2]) // 2, (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
    return x


def initial_noise(shape: tuple[int, int, int, int], seed: int, *, mode: str = "diffusers",
                  generator: torch.Generator | None = None, subseed: int = 0, subseed_strength: float = 0.0,
                  resize_from: tuple[int, int] = (0, 0), downscale: int = 8):
    """(the generator the sampler draws its step noise from, the initial noise (B, C, h, w)).
    diffusers mode continues `generator` when given (img2img draws its encoding first)."""
    if mode == "a1111":
        b = shape[0]
        rng = ImageNoise(shape[1:], image_seeds(seed, b, mode), image_seeds(subseed, b, mode),
                         subseed_strength, resize_from, downscale)
        return rng, rng.first()
    if mode != "diffusers":
        raise ValueError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {mode!r}")
    if resize_from[0] > 0 and resize_from[1] > 0:
        raise ValueError("seed_resize_from needs seed mode 'a1111'")
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if subseed_strength:
        sub = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed), dtype=torch.float32)
        noise = torch.stack([slerp(subseed_strength, n, s) for n, s in zip(noise, sub)])
    return generator, noise


def step_noise(x: torch.Tensor, generator) -> torch.Tensor:
    """A sampler step's noise draw shaped like x, on the generator's device (diffusers'
    `randn_tensor`); per image from an `ImageNoise` (A1111's seed mode)."""
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
