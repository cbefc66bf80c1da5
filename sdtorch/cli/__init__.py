"""Command line: `sdtorch generate | img2img | inpaint | upscale | info | dataset | train`.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

from sdtorch.cli.control import add_control_arguments, control_unit
from sdtorch.cli.speed import speed_options
from sdtorch.sampling import samplers
from sdtorch.sampling.schedulers import SCHEDULERS

EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` -> (path, strength); a colon inside the path (C:\\...) stays part of it."""
    path, sep, strength = text.rpartition(":")
    try:
        return (path, float(strength)) if sep and path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default=None,
                   help=".safetensors / .ckpt file or diffusers folder (default: the built-in 64x64 emoji model)")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m_karras", help=f"one of: {', '.join(samplers.NAMES)}")
    p.add_argument("--scheduler", default="automatic", choices=SCHEDULERS,
                   help="spacing of the noise levels (automatic: the sampler's own, as in diffusers)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale; <= 1 turns guidance off")
    speed_options(p)
    p.add_argument("--seed", type=int, default=None, help="default: random (written into the PNG)")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--seed-mode", choices=["diffusers", "a1111"], default="diffusers",
                   help="diffusers: one generator for the batch (the reference's images; default); a1111: "
                   "image i from seed + i, as AUTOMATIC1111")
    p.add_argument("--subseed", type=int, default=None, help="variation seed (default: random)")
    p.add_argument("--subseed-strength", type=float, default=0.0, help="0: the seed's noise .. 1: the subseed's")
    p.add_argument("--tiling", action="store_true", help="seamless tiling: the image wraps around at its edges")
    p.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="draw the seed's noise at this size and paste it in the middle (--seed-mode a1111)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--clip-skip", type=int, default=None, help="1 = last CLIP layer, 2 = penultimate")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="default: detected/guessed")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="weights and activations; bf16 is the fast CPU path (norms and sampler state stay fp32); "
                   "int8: the UNet quantized by PT2E after calibration runs (minutes; pip install torchao)")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="apply a LoRA file (kohya/A1111/ComfyUI/Civitai or diffusers format) with a "
                   "strength (default 1); repeatable")
    p.add_argument("--refiner", metavar="PATH", default=None,
                   help="SDXL refiner checkpoint: takes over at --refiner-switch-at of the steps (A1111's refiner)")
    p.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F")
    add_control_arguments(p)
    p.add_argument("--low-memory", action="store_true",
                   help="text encoders freed once the prompts are encoded, a single file's UNet read only then "
                        "(never both in memory), the VAE tiled from 1024x1024")
    p.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="folder the prompt's <lora:NAME:STRENGTH> tags are looked up in")
    _memory_options(p)


def _memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile-vae", action=argparse.BooleanOptionalAction, default=None,
                   help="VAE decode/encode in overlapping tiles, in bounded memory (default: for images "
                   "over 1024x1024 with SD's VAE)")
    p.add_argument("--tile-size", type=_positive_int, default=None, metavar="N",
                   help="VAE tile side in latent cells (default 64: 512 pixels for SD)")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="N", help="cells tiles share (default 16)")
    p.add_argument("--decoder", choices=["vae", "tiny"], default="vae",
                   help="tiny: a TAESD-style decoder, fast and approximate (the built-in model ships one)")
    p.add_argument("--tiny-decoder", metavar="PATH", help="its file (taesd_decoder / taesdxl_decoder)")
    p.add_argument("--attention-chunk", type=int, default=0, metavar="N",
                   help="UNet attention over N query positions at a time (default 0: all at once)")


def _set_memory_options(pipe, args: argparse.Namespace) -> None:
    from sdtorch.generate.loading import load_tiny_decoder
    tile = args.tile_size or pipe.vae_tile[0]
    overlap = pipe.vae_tile[1] if args.tile_overlap is None else args.tile_overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"--tile-overlap must be in [0, tile size {tile}), got {overlap}")
    pipe.tile_vae, pipe.vae_tile = args.tile_vae, (tile, overlap)
    if args.decoder == "tiny" or args.tiny_decoder:
        pipe.tiny_decoder = load_tiny_decoder(args.tiny_decoder, pipe)
    pipe.attention_chunk = args.attention_chunk
    pipe.low_memory = args.low_memory


def _prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-syntax", choices=["a1111", "plain"], default="a1111",
                   help="a1111: (emphasis:1.2), [less], BREAK, <lora:...>, prompts past 75 tokens; "
                   "plain: the reference's encoding, truncated at 77 tokens")
    p.add_argument("--embeddings", metavar="DIR", help="textual-inversion embeddings (.pt/.safetensors); "
                   "a file's stem is its trigger word")
    p.add_argument("--from-png", metavar="FILE", help="take prompt, seed, sampler, steps, CFG, size, ... from a "
                   "PNG's A1111 infotext (flags given here win)")
    p.add_argument("--styles-file", metavar="CSV", help="A1111's styles.csv (name, prompt, negative_prompt)")
    p.add_argument("--style", action="append", default=[], metavar="NAME", help="apply a style; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtorch", description="Stable Diffusion in plain PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and detected")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt", nargs="?", help="(or --from-png)")
    _common(gen)
    _prompt_options(gen)
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--hires", action="store_true", help="hires fix: generate, upscale, img2img again (A1111's)")
    gen.add_argument("--hires-scale", type=float, default=2.0)
    gen.add_argument("--hires-resize", metavar="WxH", default=None, help="final size instead of --hires-scale")
    gen.add_argument("--hires-upscaler", default="Latent", help="Latent, Latent (nearest), ..., Lanczos, Nearest, None")
    gen.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (default: --steps)")
    gen.add_argument("--hires-strength", type=float, default=0.7, help="second-pass denoising strength")
    gen.add_argument("--layout", metavar="MAP", default=None,
                     help="a picture of coloured regions for a layout model (default model then: the built-in layout one)")
    gen.add_argument("--condition", metavar="FILE", help="input of the model's condition encoder (.npy or .pt tensor), "
                     "e.g. a scan for a model from `sdtorch train decoder-demo`; the prompt may then be empty")
    gen.add_argument("--process", metavar="FILE", help="also save the predicted clean image of every step: "
                     "a .gif animation or a .png strip")

    ed = sub.add_parser("edit", help="prompt-to-prompt: a source image and its edit from one seed")
    ed.add_argument("prompt", help="source prompt")
    ed.add_argument("target", help="edited prompt")
    ed.add_argument("--mode", choices=["replace", "refine", "reweight"], default="replace")
    ed.add_argument("--cross-steps", type=float, default=0.8, help="fraction of steps with injected cross-attention")
    ed.add_argument("--self-steps", type=float, default=0.4, help="fraction of steps with injected self-attention")
    ed.add_argument("--weight", action="append", default=[], metavar="WORD=X", help="reweight: scale WORD's attention")
    ed.add_argument("--blend", action="append", default=[], metavar="WORD", help="local blending: edit only near WORD")
    _common(ed)
    ed.set_defaults(sampler="ddim")
    ed.add_argument("--width", type=int, default=None)
    ed.add_argument("--height", type=int, default=None)

    att = sub.add_parser("attention", help="generate and save per-token cross-attention maps")
    att.add_argument("prompt")
    _common(att)
    _prompt_options(att)
    att.add_argument("--width", type=int, default=None)
    att.add_argument("--height", type=int, default=None)

    i2i = sub.add_parser("img2img", help="image + text to image")
    i2i.add_argument("image")
    i2i.add_argument("prompt")
    i2i.add_argument("--strength", type=float, default=0.75, help="0 = keep the image, 1 = ignore it")
    i2i.add_argument("--image-cfg", type=float, default=1.5, metavar="S",
                     help="instruct-pix2pix models: image guidance scale (A1111's Image CFG scale)")
    i2i.add_argument("--depth", metavar="MAP", default=None,
                     help="depth-to-image models: the depth map (grey image or .npy/.pt tensor; brighter = nearer)")
    _common(i2i)
    _prompt_options(i2i)

    up = sub.add_parser("upscale", help="4x larger with the SD x4 upscaler (-c x4-upscaler-ema.safetensors)")
    up.add_argument("image", help="the low-resolution image (its size, rounded down to a multiple of 8)")
    up.add_argument("prompt", nargs="?", default="", help="what the image shows (guides the detail)")
    up.add_argument("--noise-level", type=int, default=20, metavar="N",
                    help="noise added to the input, 0..350 (more: more invented detail; default 20)")
    _common(up)
    _prompt_options(up)

    inp = sub.add_parser("inpaint", help="repaint the white part of a mask, or extend the canvas")
    inp.add_argument("image")
    inp.add_argument("prompt")
    inp.add_argument("--mask", help="white = repaint; same size as the image")
    inp.add_argument("--extend", metavar="L,R,T,B", help="outpaint: pixels to add left,right,top,bottom")
    inp.add_argument("--strength", type=float, default=1.0)
    _common(inp)
    _prompt_options(inp)

    info = sub.add_parser("info", help="what a checkpoint is")
    info.add_argument("path")
    info.add_argument("--prediction", choices=["eps", "v"], default=None)

    from sdtorch.cli.train import add_train_command
    from sdtorch.training.data import add_dataset_command

    add_dataset_command(sub)
    add_train_command(sub)
    from sdtorch.serve.server import build_parser as serve_parser

    serve_parser(sub.add_parser("serve", help="AUTOMATIC1111-compatible HTTP API, job queue and web page"))
    from sdtorch.serve.cluster import add_worker_command

    add_worker_command(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from sdtorch.cli.recall import apply_infotext, apply_style_options
    from sdtorch.cli.speed import apply_preset
    from sdtorch.editing import inspect, p2p
    from sdtorch.editing.pictures import attention_grid, save_process
    from sdtorch.generate.loading import BUILTIN_LAYOUT, load
    from sdtorch.generate.params import GenerationParams, validate

    if getattr(args, "preset", None):
        apply_preset(args, args.argv)
    if getattr(args, "from_png", None):
        apply_infotext(args, args.argv)
    if args.prompt is None and getattr(args, "condition", None):
        args.prompt = ""
    if args.prompt is None:
        raise ValueError("give a prompt (or --from-png FILE)")
    apply_style_options(args)
    size = (getattr(args, "width", None), getattr(args, "height", None))
    # Check the arguments before spending seconds on loading the model.
    validate(GenerationParams(args.prompt, args.negative, args.steps, args.sampler, args.cfg, 0,
                              *size, args.batch, args.eta, args.clip_skip))
    if hasattr(args, "strength") and not 0 <= args.strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {args.strength}")
    if args.deep_cache < 0 or args.deep_cache_branch < 0:
        raise ValueError(f"--deep-cache and --deep-cache-branch must be >= 0, got {args.deep_cache}, "
                         f"{args.deep_cache_branch}")
    path = args.checkpoint or (BUILTIN_LAYOUT if getattr(args, "layout", None) else None)
    dtype = "fp32" if args.dtype == "int8" else args.dtype  # int8: the UNet quantized from fp32
    pipe = load(path, prediction=args.prediction, dtype=dtype, compile=args.compile or False, low_memory=args.low_memory)
    if args.dtype == "int8":
        from sdtorch.generate.quantized import quantize_pipeline
        w, h = (n or pipe.config.sample_size for n in size)  # img2img: the native size (else eager)
        pipe._compiled = quantize_pipeline(pipe, w, h, args.batch)
    _set_memory_options(pipe, args)
    args.refiner_pipe = load(args.refiner, dtype=dtype, low_memory=args.low_memory) if args.refiner else None
    args.control_units = tuple(control_unit(spec, pipe, args) for spec in args.control)
    pipe.deep_cache = (args.deep_cache, args.deep_cache_branch) if args.deep_cache > 1 else None
    for spec in args.lora:
        pipe.load_lora(*_lora_spec(spec))
    if args.lora_dir:
        pipe.set_lora_dir(args.lora_dir)
    if args.command != "edit":  # editing encodes plainly (its token alignment is of plain tokens)
        pipe.prompt_syntax = args.prompt_syntax
        if args.embeddings:
            print(f"embeddings: {', '.join(pipe.load_embeddings(args.embeddings)) or 'none'}", file=sys.stderr)
    name = args.checkpoint or "built-in emoji model"
    print(f"model: {name} (prediction {pipe.config.prediction}: {pipe.prediction_source})", file=sys.stderr)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    options = dict(steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, seed=seed,
                   batch_size=args.batch, eta=args.eta, clip_skip=args.clip_skip)
    if args.scheduler != "automatic" and (args.command in ("edit", "attention") or getattr(args, "process", None)):
        raise ValueError(f"--scheduler {args.scheduler} is not supported by {args.command} --process/edit/attention; "
                         "use a combined sampler name such as euler_karras")
    if args.command == "generate" and args.process:
        images, frames, sigmas = inspect.process(pipe, args.prompt, args.negative, width=size[0], height=size[1], **options)
        print(save_process(frames, sigmas, args.process))
    elif args.command in ("generate", "img2img", "inpaint", "upscale"):
        images = pipe.run(_request(args, seed), on_step=progress_bar()).images
    elif args.command == "attention":
        images, maps, labels = inspect.attention(pipe, args.prompt, args.negative, width=size[0], height=size[1], **options)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            path = out / f"attention-{seed}-{i}.png"
            attention_grid(image, maps[i], labels).save(path)
            print(path)
    elif args.command == "edit":
        weights = {}
        for item in args.weight:
            word, _, value = item.partition("=")
            try:
                weights[word] = float(value)
            except ValueError:
                raise ValueError(f"--weight takes WORD=NUMBER, got {item!r}") from None
        options.pop("batch_size"), options.pop("eta"), options.pop("clip_skip")
        images = p2p.edit(pipe, args.prompt, args.target, mode=args.mode, cross_steps=args.cross_steps,
                           self_steps=args.self_steps, weights=weights, blend=args.blend or None,
                           negative_prompt=args.negative, width=size[0], height=size[1], **options)
    _save_all(images, Path(args.out), seed)
    return 0


def progress_bar():
    """An `on_step` callback for `Pipeline.run` drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    state = {}

    def on_step(step: int, total: int, latents) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr)
        state["bar"].update(1)
        if step == total:
            state["bar"].close()

    return on_step


def _request(args: argparse.Namespace, seed: int):
    """The `GenerationRequest` of a generate / img2img / inpaint / upscale command line."""
    from sdtorch.cli.inputs import condition, depth, images, layout
    from sdtorch.generate import GenerationRequest

    init, mask = images(args)
    return GenerationRequest(
        args.prompt, args.negative, args.steps, args.sampler, args.scheduler, args.cfg, seed,
        getattr(args, "width", None), getattr(args, "height", None), args.batch, args.eta, args.clip_skip,
        prompt_syntax=args.prompt_syntax, init_image=init, mask=mask,
        strength=getattr(args, "strength", 0.75), deep_cache=args.deep_cache if args.deep_cache > 1 else 0,
        deep_cache_branch=args.deep_cache_branch, tile_vae=args.tile_vae, attention_chunk=args.attention_chunk,
        decoder=args.decoder, timestep_spacing=args.timestep_spacing, token_merging_ratio=args.tome,
        tome_options=(args.tome_max_downsample, 2, 2),
        seed_mode=args.seed_mode, subseed=-1 if args.subseed is None else args.subseed,
        subseed_strength=args.subseed_strength, seed_resize_from=_size(args.seed_resize_from), tiling=args.tiling,
        hires=_hires(args), condition=condition(getattr(args, "condition", None)),
        refiner=getattr(args, "refiner_pipe", None), refiner_switch_at=args.refiner_switch_at,
        controls=getattr(args, "control_units", ()), image_cfg_scale=getattr(args, "image_cfg", 1.5),
        depth_map=depth(getattr(args, "depth", None)), noise_level=getattr(args, "noise_level", 20),
        layout=layout(getattr(args, "layout", None)),
    ).validate()


def _hires(args: argparse.Namespace):
    if not getattr(args, "hires", False):
        return None
    from sdtorch.generate.hires import HiresFix

    return HiresFix(scale=args.hires_scale, resize=_size(args.hires_resize), upscaler=args.hires_upscaler,
                    steps=args.hires_steps, strength=args.hires_strength)


def _size(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 0)
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def _save_all(images, out: Path, seed: int) -> None:
    from sdtorch.generate.pipeline import save_png

    out.mkdir(parents=True, exist_ok=True)
    start = len(list(out.glob("*.png")))
    for i, image in enumerate(images):
        print(save_png(image, out / f"{start + i:05d}-{seed}.png"))


def _worker(args: argparse.Namespace) -> int:
    from sdtorch.serve.cluster import run_worker

    return run_worker(args)


def _serve(args: argparse.Namespace) -> int:
    from sdtorch.serve.server import serve

    return serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        from sdtorch.cli.info import cmd_info
        from sdtorch.cli.train import cmd_train
        from sdtorch.training.data import cmd_dataset

        commands = {"generate": cmd_generate, "img2img": cmd_generate, "inpaint": cmd_generate, "attention": cmd_generate,
                    "edit": cmd_generate, "upscale": cmd_generate,
                    "info": cmd_info, "dataset": cmd_dataset, "train": cmd_train, "serve": _serve,
                    "worker": _worker}
        return commands[args.command](args)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError) as e:  # CheckpointError is a ValueError
        msg = str(e).strip() or type(e).__name__
        print(f"sdtorch: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
