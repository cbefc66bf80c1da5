"""Large images within memory: tiled VAE decoding and chunked attention, on this machine.

    python benchmarks/memory.py [--size 2048] [--tiles 64] [--unet-size 1024] [--chunk 2048]

Every configuration runs in a fresh process, so its peak RSS is its own (as in speed.py), under
an address-space limit (--mem-limit GB): one that does not fit stops with an allocation error
instead of waking the kernel's OOM killer, and is reported as not fitting.

- vae-untiled, vae-tiled-T: the SD 1.5-sized VAE with random weights (built as the tests'
  reference builder builds it: diffusers `AutoencoderKL`, seed 1, converted) decodes the latents
  of a --size x --size image, whole or in tiles of at most T latent cells (--overlap); seconds,
  peak RSS, and the PSNR of each tiled image against the untiled one. The latents are those of a
  photo (scikit-image's astronaut if installed, else a synthetic picture) encoded at 512x512 and
  upscaled to the size (as a "hires fix" latent upscale makes them).
- unet-fused, unet-fused-chunk, unet-math, unet-math-chunk: one guided step (UNet batch 2) of
  the SD 1.5-sized UNet (random weights) at --unet-size, with PyTorch's fused attention kernel
  and with its "math" kernel (which holds every (N, L) score matrix, as kernels on some devices
  do), whole or over --chunk query positions at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNET_CONFIGS = ["unet-fused", "unet-fused-chunk", "unet-math", "unet-math-chunk"]


def _peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it does not
    start from the peak of the process that started this one)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20  # kB -> GB


def _photo(size: int):
    import torch
    import torch.nn.functional as F

    try:
        from skimage.data import astronaut

        x = torch.from_numpy(astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    except ImportError:  # rings and a gradient
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 512), torch.linspace(-1, 1, 512), indexing="ij")
        r = (xx**2 + yy**2).sqrt()
        x = torch.stack([torch.sin(12 * r), xx, torch.cos(7 * yy + 3 * xx)])[None]
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def prepare(cache: Path, size: int) -> tuple[Path, Path]:
    """The SD 1.5-sized random VAE (sdtorch layout) and the latents to decode, cached."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from sdtorch.config import SD15
    from sdtorch.models.vae import AutoencoderKL

    weights, latents = cache / "sd15-vae.safetensors", cache / f"latents-{size}.pt"
    if not weights.exists():
        from diffusers import AutoencoderKL as DiffusersVAE

        from sdtorch.formats.diffusers import vae_from_diffusers
        from sdtorch.formats.diffusers_config import diffusers_configs

        torch.manual_seed(1)  # as tests/reference_models.build_reference_folder seeds the VAE
        ref = DiffusersVAE(**diffusers_configs(SD15)["vae"])
        save_file({k: v.contiguous() for k, v in vae_from_diffusers(ref.state_dict(), SD15.vae).items()}, weights)
    if not latents.exists():
        vae = AutoencoderKL(SD15.vae).eval()
        vae.load_state_dict(load_file(weights))
        with torch.no_grad():
            z = vae.encode(_photo(512)).mean
        torch.save(F.interpolate(z, size=(size // 8, size // 8), mode="bicubic", align_corners=False), latents)
    return weights, latents


def run_vae(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    from sdtorch.adapters.tiling import tiled_decode
    from sdtorch.config import SD15
    from sdtorch.models.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(SD15.vae).eval()
    vae.load_state_dict(load_file(args.weights), assign=True)
    z = torch.load(args.latents)
    base = _peak_rss_gb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.worker == "vae-untiled":
            image = vae.decode(z)
        else:
            image = tiled_decode(vae, z, tile=int(args.worker.rsplit("-", 1)[1]), overlap=args.overlap, norm=args.norm,
                                 stats=args.stats)
    seconds = time.perf_counter() - t0
    torch.save(image, args.cache / f"{args.worker}.pt")
    return {"s": seconds, "base": base}


def run_unet(args: argparse.Namespace) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdtorch.config import SD15
    from sdtorch.models.unet import CrossAttention, UNetModel

    torch.manual_seed(0)
    unet = UNetModel(SD15.unet).eval()
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.chunk = args.chunk if args.worker.endswith("chunk") else 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.unet_size // 8, args.unet_size // 8, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    kernel = sdpa_kernel(SDPBackend.MATH) if "math" in args.worker else contextlib.nullcontext()  # default: fused
    base = _peak_rss_gb()
    t0 = time.perf_counter()
    with torch.no_grad(), kernel:
        unet(x, torch.tensor([500.0]), context)
    return {"s": time.perf_counter() - t0, "base": base}


def worker(args: argparse.Namespace) -> None:
    limit = int(args.mem_limit * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        out = run_vae(args) if args.worker.startswith("vae") else run_unet(args)
    except (MemoryError, RuntimeError) as e:
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out = {"error": f"does not fit in {args.mem_limit:g} GB"}
    out["rss"] = _peak_rss_gb()
    print("RESULT " + json.dumps(out))


def psnr(a, b) -> float:
    """PSNR (dB) of two decoded images as saved, [-1, 1] -> [0, 1] and clamped, peak 1."""
    mse = float(((a / 2 + 0.5).clamp(0, 1) - (b / 2 + 0.5).clamp(0, 1)).square().mean())
    return 10 * math.log10(1 / mse) if mse else math.inf


def table(results: dict[str, dict]) -> str:
    rows = [f"{'config':<20}{'seconds':>9}{'peak RSS GB':>13}{'model GB':>10}{'PSNR dB':>9}"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"{name:<20}{r['error']:>41}")
            continue
        p = f"{r['psnr']:.1f}" if "psnr" in r else ""
        rows.append(f"{name:<20}{r['s']:>9.1f}{r['rss']:>13.2f}{r['base']:>10.2f}{p:>9}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="decoded image side, pixels")
    parser.add_argument("--tiles", type=int, nargs="*", default=[64], help="tile sizes (latent cells) to run")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap (latent cells)")
    parser.add_argument("--norm", default="estimate", choices=["tile", "estimate"])
    parser.add_argument("--stats", type=int, default=128, help="cells a side of the statistics pass (norm estimate)")
    parser.add_argument("--unet-size", type=int, default=1024, help="UNet image side, pixels (0: skip)")
    parser.add_argument("--chunk", type=int, default=2048, help="query positions per attention call")
    parser.add_argument("--no-untiled", action="store_true", help="skip the untiled decode")
    parser.add_argument("--mem-limit", type=float, default=20.0, help="address-space limit per run, GB")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sdtorch-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--latents", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.cache.mkdir(parents=True, exist_ok=True)
    weights, latents = prepare(args.cache, args.size)
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"VAE decode {args.size}x{args.size} (tiles overlap {args.overlap}, norm {args.norm}, stats {args.stats}); "
          f"UNet {args.unet_size}x{args.unet_size}, batch 2, chunk {args.chunk}; limit {args.mem_limit:g} GB")
    configs = ([] if args.no_untiled else ["vae-untiled"]) + [f"vae-tiled-{t}" for t in args.tiles]
    configs += UNET_CONFIGS if args.unet_size else []
    results = {}
    for name in configs:
        cmd = [sys.executable, __file__, "--worker", name, "--weights", str(weights), "--latents", str(latents),
               "--cache", str(args.cache), "--overlap", str(args.overlap), "--norm", args.norm, "--stats", str(args.stats),
               "--unet-size", str(args.unet_size), "--chunk", str(args.chunk), "--mem-limit", str(args.mem_limit)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:  # killed (e.g. by the OOM killer) or failed otherwise
            results[name] = {"error": f"failed ({proc.stderr.strip().splitlines()[-1:] or proc.returncode})"}
        else:
            results[name] = json.loads(line[-1][len("RESULT "):])
        print(f"  {name}: {results[name]}", flush=True)
    untiled = args.cache / "vae-untiled.pt"
    if "error" not in results.get("vae-untiled", {"error": ""}):
        for t in args.tiles:
            if "error" not in results[f"vae-tiled-{t}"]:
                tiled = torch.load(args.cache / f"vae-tiled-{t}.pt")
                results[f"vae-tiled-{t}"]["psnr"] = psnr(tiled, torch.load(untiled))
    print(table(results))


if __name__ == "__main__":
    main()
