"""What a live preview costs next to one denoising step (issue 14's budget: at most 5 %).

One step = one UNet call on a guided batch of 2 (cond + uncond), as the samplers make it. The
cheap preview is the latent -> RGB linear map of the first image plus the PNG encode the server
sends; the full preview is a VAE decode of one image. Models: the built-in emoji model (its fitted
map) and a random-weight UNet/VAE of the SD 1.5 architecture at 512x512 (the published map).

    python benchmarks/preview.py [--repeat 5] [--skip-sd15]
"""

from __future__ import annotations

import argparse
import io
import time

import torch

import sdtorch
from sdtorch.config import SD15
from sdtorch.serve.preview import full_preview, latent_preview, latent_rgb_map, published_rgb


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cheap_cost(latents, config, rgb, scale: int) -> float:
    def run():
        image = latent_preview(latents, config, rgb, scale=scale)
        image.save(io.BytesIO(), format="PNG", compress_level=1)
    return run


def measure(name: str, unet, config, rgb, latent: int, scale: int, repeat: int, decode=None) -> None:
    ctx = torch.randn(2, 77, config.unet.context_dim)
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500.0])
    with torch.no_grad():
        step = best_of(lambda: unet(x, t, ctx), repeat)
    cheap = best_of(cheap_cost(x, config, rgb, scale), max(repeat, 20))
    print(f"{name}: step {step * 1e3:.1f} ms, cheap preview {cheap * 1e3:.2f} ms "
          f"({rgb.source}) = {100 * cheap / step:.2f} % of a step")
    if decode is not None:
        with torch.no_grad():
            full = best_of(lambda: decode(x), max(1, repeat // 2))
        print(f"{name}: full preview (VAE decode) {full * 1e3:.1f} ms = {100 * full / step:.1f} % of a step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-sd15", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    pipe = sdtorch.load(None)
    f = pipe.vae.downscale
    latent = pipe.config.sample_size // f
    measure("built-in emoji 64x64", pipe.unet, pipe.config, latent_rgb_map(pipe), latent, f, args.repeat,
            decode=lambda x: full_preview(pipe, x))

    if not args.skip_sd15:
        torch.manual_seed(0)
        unet = type(pipe.unet)(SD15.unet).eval()  # random weights, SD 1.5 size (860 M parameters)
        measure("SD 1.5 architecture 512x512", unet, SD15, published_rgb(SD15), 64, 8, max(1, args.repeat // 2))


if __name__ == "__main__":
    main()
