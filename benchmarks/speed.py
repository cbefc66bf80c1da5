"""sdtorch vs diffusers on the same random SD 1.5 (or SDXL) weights, side by side, on this machine.

    python benchmarks/speed.py [--model sd15|sdxl] [--steps 4] [--size 512] [--configs ...] [--openvino-python PY]

Builds (once, cached in --cache) a random-weight diffusers folder and its original-layout single
file in fp16 (SD 1.5: 2.1 GB; SDXL base: 6.9 GB, as the files people download), then runs each
configuration in a fresh process so peak memory is its own:

- load: seconds from `import` of the library to a ready pipeline built from the fp16 single file
  (diffusers: `StableDiffusionPipeline.from_single_file`, upcast to the configuration's dtype);
  first step: from the same start to the end of the first denoising step.
- step: seconds per guided denoising step (batch 1, CFG on = a UNet batch of 2) with the Euler
  sampler on both sides (one UNet call per step), the mean of the gaps between consecutive
  step callbacks (the first step, a warm-up and for "compiled" the compilation, is in no gap;
  with 4 steps the 3 gaps are one whole DeepCache cycle of interval 3);
  TFLOP/s: the UNet's FLOPs per step (PyTorch's FlopCounterMode: matmuls, convolutions,
  attention) over that time.
- decode: seconds for the VAE decode of the final latents (second of two decodes).
- peak RSS: the process's maximum resident memory over load + generation + decode.

SDXL (`--model sdxl`, default size 1024): diffusers loads the folder (StableDiffusionXLPipeline.
from_pretrained; its from_single_file leaves OpenCLIP bigG unloaded under transformers 5) and its
bf16 is bfloat16 weights (torch_dtype), as SDXL is run on CPUs where fp32 weights would need 14 GB;
sdtorch-bf16-lowmem is `--low-memory` (`load(low_memory=True)`): the text encoders are read, used and
freed before the UNet is read, and the VAE decodes in tiles from 1024^2. Where bfloat16 is
emulated (CPU capability AVX2: the bf16 matmul rate printed is ~0), measure fp32 instead:
`--configs diffusers-fp32 sdtorch-fp32 sdtorch-fp32-lowmem`.

Configurations: diffusers fp32 and bf16 (SD 1.5: autocast, as its docs advise for CPUs);
OpenVINO (optimum-intel's OVStableDiffusionPipeline on the IR it exports once from the same
diffusers folder, export not timed; static shapes by reshape(); its default inference precision,
bf16 where the CPU has it, and f32); sdtorch fp32, bf16 (bfloat16 weights, channels-last, norms and
sampler state in fp32), bf16 compiled (the same through torch.compile), bf16/fp32 openvino (the
UNet through OpenVINO's runtime, `--compile openvino`; the graph is converted by an untimed first
run and read back from disk by the timed one), bf16 deepcache (DeepCache, interval 3, branch 0) and
bf16 tome (token merging, ratio 0.5 at full latent resolution): the last two are approximations,
see their PSNR; bf16 tiny decodes with a random-weight TAESD-shaped decoder (its decode time only).
Ratios: against diffusers fp32 ("/d32"), diffusers bf16 ("/d16"), OpenVINO default ("/ov") and
f32 ("/ov32"); below 1 is better. PSNR: the image against sdtorch fp32's (same seed and sampler).

OpenVINO needs an environment of its own (optimum-intel pins a transformers older than the tests'):
    python -m venv ovenv && ovenv/bin/pip install "optimum-intel[openvino,diffusers]"
    python benchmarks/speed.py --openvino-python ovenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on the moon"
CALIBRATION = ["a castle on a hill at sunset", "a bowl of fruit on a wooden table"]  # int8's calibration runs
CONFIGS = ["diffusers-fp32", "diffusers-bf16", "openvino-default", "openvino-f32", "sdtorch-fp32", "sdtorch-bf16",
           "sdtorch-bf16-compiled", "sdtorch-bf16-deepcache", "sdtorch-bf16-openvino", "sdtorch-fp32-openvino",
           "sdtorch-bf16-tome", "sdtorch-bf16-tiny", "sdtorch-int8",
           "sdtorch-bf16-lowmem", "sdtorch-fp32-lowmem"]
# --model: (preset name, diffusers pipeline class, default size, default configurations)
MODELS = {
    "sd15": ("SD15", "StableDiffusionPipeline", 512, CONFIGS[:-2]),  # openvino-*: needs --openvino-python
    "sdxl": ("SDXL", "StableDiffusionXLPipeline", 1024, ["diffusers-bf16", "sdtorch-bf16", "sdtorch-bf16-lowmem"]),
}


def _preset(model: str):
    import sdtorch.config

    return getattr(sdtorch.config, MODELS[model][0])


def build(cache: Path, model: str) -> tuple[Path, Path]:
    """The model's random-weight diffusers folder and single file, both float16."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from reference_models import build_reference_folder, write_original_checkpoint

    folder, ckpt = cache / f"{model}-fp16-diffusers", cache / f"{model}-fp16.safetensors"
    if not (folder / "model_index.json").exists():
        build_reference_folder(_preset(model), folder, dtype=torch.float16)
    if not ckpt.exists():
        write_original_checkpoint(folder, ckpt, dtype=torch.float16)
    return folder, ckpt


def matmul_tflops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """What this machine's matrix multiply reaches: a large square matmul, TFLOP/s (the best of
    `repeats`), the practical ceiling for the UNet's convolutions and projections."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def unet_flops(size: int, model: str) -> float:
    """FLOPs of one guided UNet call (batch 2) at size x size, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdtorch.models.unet import UNetModel

    cfg = _preset(model).unet
    with torch.device("meta"):
        unet = UNetModel(cfg)
        x, context = torch.empty(2, 4, size // 8, size // 8), torch.empty(2, 77, cfg.context_dim)
        vector = torch.empty(2, cfg.adm_in_channels) if cfg.adm_in_channels else None
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500.0]), context, vector)
    return counter.get_total_flops()


def _peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it is not
    inherited from the parent process that started this one)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20  # kB -> GB


def run_diffusers(ckpt: Path, folder: Path, dtype: str, steps: int, size: int, model: str) -> dict:
    import torch

    t0 = time.perf_counter()
    import diffusers
    from diffusers import EulerDiscreteScheduler

    cls = getattr(diffusers, MODELS[model][1])
    if model == "sd15":
        pipe = cls.from_single_file(str(ckpt), config=str(folder), local_files_only=True, safety_checker=None,
                                    requires_safety_checker=False, torch_dtype=torch.float32)
    else:  # bf16: bfloat16 weights
        pipe = cls.from_pretrained(folder, local_files_only=True,
                                   torch_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    stamps = []

    def on_step(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16" and model == "sd15"):
        latents = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                       callback_on_step_end=on_step).images
        decode = _decode_time(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor))
    return _timings(t0, load, stamps, decode)


def openvino_folder(cache: Path, folder: Path, model: str) -> Path:
    """The OpenVINO IR of the diffusers folder, exported once by optimum-intel (not timed)."""
    out = cache / f"{model}-openvino"
    if not (out / "model_index.json").exists():
        from optimum.intel import OVStableDiffusionPipeline

        OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False).save_pretrained(out)
    return out


def run_openvino(ov_folder: Path, precision: str, steps: int, size: int, image_out: Path) -> dict:
    """optimum-intel's pipeline on the exported IR: static shapes (reshape), the default inference
    precision (bf16 where the CPU has it) or f32, the same prompt, seed and Euler sampler."""
    import torch

    t0 = time.perf_counter()
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ov_config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": "f32"}
    pipe = OVStableDiffusionPipeline.from_pretrained(ov_folder, compile=False, ov_config=ov_config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    stamps = []

    def on_step(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    latents = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                   callback_on_step_end=on_step).images
    latents = torch.as_tensor(latents) / pipe.vae.config.scaling_factor
    decode = _decode_time(lambda: pipe.vae.decode(latents))
    torch.save((pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).float(), image_out)
    out = _timings(t0, load, stamps, decode)
    out["precision"] = str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
    return out


def _decode_time(decode) -> float:
    decode()  # the first call also pays one-off costs (oneDNN primitive creation)
    t1 = time.perf_counter()
    decode()
    return time.perf_counter() - t1


def _timings(t0: float, load: float, stamps: list[float], decode: float) -> dict:
    return {"load": load, "first": stamps[0] - t0, "step": statistics.mean(b - a for a, b in zip(stamps, stamps[1:])),
            "decode": decode}


def run_sdtorch(ckpt: Path, dtype: str, steps: int, size: int, option: str, image_out: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    import sdtorch
    from sdtorch.adapters.tome import TokenMerger, token_merging
    from sdtorch.generate.pipeline import GenerationParams

    compile = {"compiled": True, "openvino": "openvino"}.get(option, False)
    pipe = sdtorch.load(ckpt, dtype="fp32" if dtype == "int8" else dtype, compile=compile, low_memory=option == "lowmem")
    load = time.perf_counter() - t0
    if dtype == "int8":  # PT2E: calibrated on the UNet inputs of CALIBRATION's runs (in "1st step")
        from sdtorch.generate.quantized import quantize_pipeline

        pipe._compiled = quantize_pipeline(pipe, size, size, steps=steps, prompts=CALIBRATION)
    pipe.deep_cache = (3, 0) if option == "deepcache" else None
    if option == "tiny":  # random weights: its decode time only (its image is not compared)
        from sdtorch.models.taesd import TinyDecoder

        pipe.tiny_decoder, pipe.decoder = TinyDecoder().to(pipe.dtype).eval(), "tiny"
    merger = TokenMerger(0.5, (size // 8, size // 8), generator=torch.Generator().manual_seed(0)) if option == "tome" else None
    stamps = []
    params = GenerationParams(PROMPT, steps=steps, sampler="euler", cfg_scale=7.5, seed=0, width=size, height=size)
    with token_merging(pipe.unet, merger):
        latents = pipe.generate_latents(params, callback=lambda d: stamps.append(time.perf_counter()), progress=False)
    if compile is True and pipe._compiled.compiled is None:
        raise RuntimeError("torch.compile fell back to eager")
    if compile == "openvino" and not pipe._compiled.graphs:
        raise RuntimeError("the OpenVINO graph was not used")
    with torch.no_grad():
        decode = _decode_time(lambda: pipe.decode(latents))
        torch.save(pipe.decode(latents), image_out)  # (1, 3, H, W) in [0, 1]
    return _timings(t0, load, stamps, decode)


def worker(args: argparse.Namespace) -> None:
    lib, dtype, *option = args.worker.split("-")
    image_out = args.cache / f"{args.model}-{args.worker}.pt"
    if lib == "diffusers":
        out = run_diffusers(args.ckpt, args.folder, dtype, args.steps, args.size, args.model)
    elif lib == "openvino":
        ov_folder = openvino_folder(args.cache, args.folder, args.model)
        out = run_openvino(ov_folder, dtype, args.steps, args.size, image_out)
    else:
        out = run_sdtorch(args.ckpt, dtype, args.steps, args.size, option[0] if option else "", image_out)
    out["rss"] = _peak_rss_gb()
    print("RESULT " + json.dumps(out))


# ratio columns: (heading, measured key, reference configuration)
RATIOS = [("step/d32", "step", "diffusers-fp32"), ("step/d16", "step", "diffusers-bf16"),
          ("step/ov", "step", "openvino-default"), ("step/ov32", "step", "openvino-f32"),
          ("dec/d32", "decode", "diffusers-fp32"), ("dec/d16", "decode", "diffusers-bf16"),
          ("ttfi/ov", "ttfi", "openvino-default"), ("RSS/d32", "rss", "diffusers-fp32"),
          ("RSS/d16", "rss", "diffusers-bf16")]


def table(results: dict[str, dict], flops: float, ttfi_steps: int = 20) -> str:
    """One row per configuration. ttfi: time to a first image in a cold process at ttfi_steps
    steps, from the measured parts: the first step (import, load, compile and step 1) plus
    ttfi_steps - 1 steps plus the decode."""
    for r in results.values():
        r["ttfi"] = r["first"] + (ttfi_steps - 1) * r["step"] + r["decode"]
    present = [c for c in RATIOS if c[2] in results]
    head = (f"{'config':<23}{'step s':>7}{'TFLOP/s':>8}{'decode s':>9}{'load s':>7}{'1st step s':>11}"
            f"{'ttfi s':>7}{'RSS GB':>7}" + "".join(f"{h:>{len(h) + 1}}" for h, _, _ in present) + f"{'PSNR dB':>8}")
    rows = [head]
    for name, r in results.items():
        cells = "".join(f"{r[key] / results[ref][key]:>{len(h) + 1}.2f}" for h, key, ref in present)
        rows.append(f"{name:<23}{r['step']:>7.2f}{flops / r['step'] / 1e12:>8.3f}{r['decode']:>9.2f}{r['load']:>7.2f}"
                    f"{r['first']:>11.2f}{r['ttfi']:>7.1f}{r['rss']:>7.2f}{cells}{r.get('psnr', ''):>8}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run (>= 3)")
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--size", type=int, help="image side (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sdtorch-bench")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="default: all (sdxl: the bf16 ones)")
    parser.add_argument("--openvino-python", default=os.environ.get("SDTORCH_OPENVINO_PYTHON"),
                        help="the Python of an environment with optimum-intel[openvino,diffusers], for the "
                             "openvino-* configurations (they pin a transformers older than the tests' one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or MODELS[args.model][2]
    args.configs = args.configs or MODELS[args.model][3]
    if args.worker:
        return worker(args)
    args.cache.mkdir(parents=True, exist_ok=True)
    folder, ckpt = build(args.cache, args.model)
    import torch

    flops = unet_flops(args.size, args.model)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {MODELS[args.model][0]} random weights (fp16 file), "
          f"{args.size}x{args.size}, batch 1, CFG on, Euler, {args.steps} steps; "
          f"UNet {flops / 1e12:.2f} TFLOP per guided step")
    print(f"matmul 2048^3 on this machine: fp32 {matmul_tflops('fp32'):.3f} TFLOP/s, "
          f"bf16 {matmul_tflops('bf16'):.3f} TFLOP/s")
    if any(c.startswith("openvino-") for c in args.configs) and not args.openvino_python:
        sys.exit("openvino-* configurations need --openvino-python (see the docstring)")
    results = {}
    for name in args.configs:
        python = args.openvino_python if name.startswith("openvino-") else sys.executable
        cmd = [python, __file__, "--worker", name, "--ckpt", str(ckpt), "--folder", str(folder),
               "--steps", str(args.steps), "--size", str(args.size), "--model", args.model]
        env = dict(os.environ, SDTORCH_CACHE=str(args.cache / "sdtorch-cache"))
        if name.endswith("-openvino"):  # the first run converts the UNet (its "export"), the timed one reads it
            subprocess.run(cmd + ["--steps", "2"], capture_output=True, text=True, env=env)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][len("RESULT "):])
        print(f"  {name}: {results[name]}", flush=True)
    if "sdtorch-fp32" in results:  # the reduced-precision images against sdtorch fp32's, same seed
        import math

        exact = torch.load(args.cache / f"{args.model}-sdtorch-fp32.pt")
        for name in results:
            if name.startswith(("sdtorch-", "openvino-")) and name not in ("sdtorch-fp32", "sdtorch-bf16-tiny"):
                mse = float((torch.load(args.cache / f"{args.model}-{name}.pt") - exact).square().mean())
                results[name]["psnr"] = f"{10 * math.log10(1 / mse):.1f}" if mse else "inf"
    print(table(results, flops))
    print("ttfi: the first step (from import: load, compile, step 1) + 19 steps + decode")


if __name__ == "__main__":
    main()
