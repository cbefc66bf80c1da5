"""sdtorch vs diffusers on the same random SD 1.5 weights, side by side, on this machine.

    python benchmarks/speed.py [--steps 3] [--size 512]

Builds (once, cached in --cache) a random-weight SD 1.5 diffusers folder and its original-layout
single file, then runs each configuration in a fresh process so peak memory is its own:

- load: seconds from nothing to a ready pipeline (diffusers: `from_single_file`).
- step: seconds per guided denoising step (batch 1, CFG on = a UNet batch of 2) with the Euler
  sampler on both sides (one UNet call per step), the median of the gaps between consecutive
  step callbacks (the first step, a warm-up, is not inside any gap).
- decode: seconds for the VAE decode of the final latents.
- peak RSS: the process's maximum resident memory over load + generation + decode.

Ratios are sdtorch / diffusers fp32 (and / diffusers bf16 for sdtorch bf16); below 1 is better.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on the moon"
CONFIGS = ["diffusers-fp32", "diffusers-bf16", "sdtorch-fp32", "sdtorch-bf16"]


def build(cache: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from reference_models import build_reference_folder, write_original_checkpoint

    from sdtorch.config import SD15

    folder, ckpt = cache / "sd15-diffusers", cache / "sd15.safetensors"
    if not (folder / "model_index.json").exists():
        build_reference_folder(SD15, folder)
    if not ckpt.exists():
        write_original_checkpoint(folder, ckpt)
    return folder, ckpt


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_diffusers(ckpt: Path, folder: Path, dtype: str, steps: int, size: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    stamps = []

    def on_step(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        latents = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                       callback_on_step_end=on_step).images
        t1 = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        decode = time.perf_counter() - t1
    return {"load": load, "step": statistics.median(b - a for a, b in zip(stamps, stamps[1:])), "decode": decode}


def run_sdtorch(ckpt: Path, dtype: str, steps: int, size: int) -> dict:
    import torch

    import sdtorch
    from sdtorch.pipeline import GenerationParams

    t0 = time.perf_counter()
    pipe = sdtorch.load(ckpt, dtype=dtype)
    load = time.perf_counter() - t0
    stamps = []
    params = GenerationParams(PROMPT, steps=steps, sampler="euler", cfg_scale=7.5, seed=0, width=size, height=size)
    latents = pipe.generate_latents(params, callback=lambda d: stamps.append(time.perf_counter()), progress=False)
    with torch.no_grad():
        t1 = time.perf_counter()
        pipe.decode(latents)
        decode = time.perf_counter() - t1
    return {"load": load, "step": statistics.median(b - a for a, b in zip(stamps, stamps[1:])), "decode": decode}


def worker(args: argparse.Namespace) -> None:
    lib, dtype = args.worker.split("-")
    if lib == "diffusers":
        out = run_diffusers(args.ckpt, args.folder, dtype, args.steps, args.size)
    else:
        out = run_sdtorch(args.ckpt, dtype, args.steps, args.size)
    out["rss"] = _peak_rss_gb()
    print("RESULT " + json.dumps(out))


def table(results: dict[str, dict]) -> str:
    base = results["diffusers-fp32"]
    rows = [f"{'config':<16}{'step s':>9}{'load s':>9}{'decode s':>10}{'peak RSS GB':>13}"
            f"{'step ×':>9}{'load ×':>9}{'decode ×':>10}{'RSS ×':>8}"]
    for name, r in results.items():
        ref = results["diffusers-bf16"] if name == "sdtorch-bf16" else base
        rows.append(f"{name:<16}{r['step']:>9.2f}{r['load']:>9.2f}{r['decode']:>10.2f}{r['rss']:>13.2f}"
                    f"{r['step'] / ref['step']:>9.2f}{r['load'] / ref['load']:>9.2f}"
                    f"{r['decode'] / ref['decode']:>10.2f}{r['rss'] / ref['rss']:>8.2f}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run (>= 3)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sdtorch-bench")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.cache.mkdir(parents=True, exist_ok=True)
    folder, ckpt = build(args.cache)
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"SD 1.5 random weights, {args.size}x{args.size}, batch 1, CFG on, {args.steps} steps")
    results = {}
    for name in args.configs:
        cmd = [sys.executable, __file__, "--worker", name, "--ckpt", str(ckpt), "--folder", str(folder),
               "--steps", str(args.steps), "--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][len("RESULT "):])
        print(f"  {name}: {results[name]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
