"""`Pipeline.run`: one `GenerationRequest` in, images and their infotexts out.

A request's settings that live on the loaded pipeline (prompt syntax, LoRAs, DeepCache, tiled
VAE, attention chunking) are applied for the length of the run and restored afterwards, under
the pipeline's lock, so concurrent runs on one loaded model never see each other's settings.
`on_step(step, total, latents)` is called after every sampler step with the current denoised
estimate (B, C, h, w) (for progress bars and previews); a cancelled `CancelToken` stops the run
at its next step with `Cancelled`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from PIL import Image

from sdtorch.adapters.seamless import seamless
from sdtorch.adapters.tome import TokenMerger, token_merging
from sdtorch.families import concat_kind
from sdtorch.generate.concat import (
    check_inputs,
    depth_latents,
    depth_tensor,
    edit_latents,
    layout_latents,
    upscale_latents,
)
from sdtorch.generate.handoff import finish_latents, refine_latents
from sdtorch.generate.images import image_tensor, img2img_start, mask_tensor, sampled_steps
from sdtorch.generate.params import GenerationParams
from sdtorch.generate.request import Cancelled, CancelToken, GenerationRequest, RequestError
from sdtorch.sampling import samplers
from sdtorch.sampling.noise import image_seeds

OnStep = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class RunResult:
    images: list[Image.Image]  # each with .info["parameters"]
    request: GenerationRequest  # with the seed resolved
    stopped_at: int | None = None  # interrupted (`CancelToken.interrupt`) after this many steps
    latents: torch.Tensor | None = field(default=None, repr=False)  # the final latents (sampler space)

    @property
    def infotexts(self) -> list[str]:
        return [im.info.get("parameters", "") for im in self.images]

    @property
    def seeds(self) -> list[int]:
        """Each image's seed (a1111 seed mode: seed, seed + 1, ...)."""
        return image_seeds(self.request.seed, len(self.images), self.request.seed_mode)


def run(pipe, request: GenerationRequest, *, on_step: OnStep | None = None,
        cancel: CancelToken | None = None, progress: bool = False, callback: Callable | None = None) -> RunResult:
    """callback(dict): also the sampler's own step dict (`x`, `denoised`, `i`, `sigma`)."""
    request = request.validate(pipe.vae.downscale).resolved()
    check_inputs(pipe.config, request)
    if request.hires is not None:
        return _hires(pipe, request, on_step, cancel, progress)
    with pipe.lock, _scoped(pipe, request):
        pixels = _pixels(request)
        params = _params(pipe, request, pixels)
        total = sampled_steps(request)
        callback = _callback(on_step, cancel, total, callback)
        if cancel is not None and cancel.cancelled:
            raise Cancelled("cancelled before it started")
        try:
            with token_merging(pipe.unet, _merger(pipe, request, params)):
                latents = _sample(pipe, request, params, pixels, callback, progress)
        except _Stop as stop:  # interrupted: the current denoised estimate is the result
            return RunResult(pipe._images(params, stop.latents), request, stopped_at=stop.step)
        return RunResult(pipe._images(params, latents), request, latents=latents)


def _shifted(on_step: OnStep | None, offset: int, total: int) -> OnStep | None:
    if on_step is None:
        return None
    return lambda step, _, latents: on_step(offset + step, total, latents)


def _hires(pipe, request: GenerationRequest, on_step, cancel, progress) -> RunResult:
    """A1111's hires fix (sdtorch.generate.hires): first pass, upscale, second img2img pass."""
    import sdtorch.generate.hires as hires

    fix, first = request.hires, replace(request, hires=None)
    total, n1 = hires.total_steps(request), sampled_steps(first)
    res = run(pipe, first, on_step=_shifted(on_step, 0, total), cancel=cancel, progress=progress)
    if res.stopped_at is not None:
        return replace(res, request=request)
    size = fix.target(res.images[0].width, res.images[0].height)
    second = replace(hires.second_pass(request, fix), width=size[2], height=size[3])
    if fix.upscaler in hires.LATENT:
        images = _latent_second_pass(pipe, second, hires.upscale_latents(res.latents, fix, size, pipe.vae.downscale),
                                     _shifted(on_step, n1, total), cancel, progress)
    else:
        images, done = [], n1
        for image, seed in zip(res.images, res.seeds):
            r = replace(second, batch_size=1, seed=seed)
            r = replace(r, init_image=hires.upscale_image(image, fix, size, r))
            out = run(pipe, r, on_step=_shifted(on_step, done, total), cancel=cancel, progress=progress)
            images += out.images
            done += sampled_steps(r)
    with pipe.lock, _scoped(pipe, first):  # A1111's infotext: the first pass's size and the hires fields
        params = _params(pipe, first, None)
        params.extra.update(hires.infotext_fields(fix, params.width, params.height))
        for i, image in enumerate(images):
            image.info["parameters"] = pipe.infotext(params, i)
    return RunResult(images, request)


def _latent_second_pass(pipe, second: GenerationRequest, latents: torch.Tensor, on_step, cancel, progress):
    with pipe.lock, _scoped(pipe, second):
        params = _params(pipe, second, None)
        start = img2img_start(params.steps, second.strength)
        callback = _callback(on_step, cancel, params.steps - start)
        source, noise = pipe._noise(params, latents.shape)
        try:
            with token_merging(pipe.unet, _merger(pipe, second, params)):
                out = pipe._sample(params, source, noise, callback, progress, init=latents, start=start)
        except _Stop as stop:  # interrupted: the state it reached
            out = stop.latents
        return pipe._images(params, out)


def _sample(pipe, request: GenerationRequest, params, pixels, callback, progress: bool) -> torch.Tensor:
    if request.init_latents is not None:
        params.extra["Denoising start"] = request.denoising_start
        return finish_latents(pipe, request.init_latents, params,
                                      _handoff(pipe, params, request.denoising_start), callback, progress)
    if request.refiner is not None:
        refiner = request.refiner
        name = refiner.path.stem if refiner.path else refiner.config.name
        params.extra |= {"Refiner": f"{name} [{refiner.model_hash()}]" if refiner.model_hash() else name,
                         "Refiner switch at": request.refiner_switch_at}
        switch = int(params.steps * request.refiner_switch_at)  # A1111: from this step on
        if switch >= params.steps:
            return pipe.generate_latents(params, callback, progress)
        with request.refiner.lock:
            return refine_latents(pipe, request.refiner, params, switch, callback, progress)
    if request.layout is not None:
        return layout_latents(pipe, request.layout, params, callback, progress)
    if pixels is None:
        stop = None if request.denoising_end is None else _handoff(pipe, params, request.denoising_end)
        return pipe.generate_latents(params, callback, progress, stop=stop)
    kind = concat_kind(pipe.config)
    if kind == "x4-upscaler":  # from noise, at the input's size; the VAE makes it 4x larger
        f = pipe.vae.downscale
        params.width, params.height = pixels.shape[-1] * f, pixels.shape[-2] * f
        params.extra["Noise level"] = request.noise_level
        return upscale_latents(pipe, pixels, params, request.noise_level, callback, progress)
    params.extra["Denoising strength"] = request.strength
    if kind == "instruct-pix2pix":
        params.extra["Image CFG scale"] = request.image_cfg_scale
        return edit_latents(pipe, pixels, params, request.strength, request.image_cfg_scale, callback, progress)
    if kind == "depth":
        return depth_latents(pipe, pixels, depth_tensor(request.depth_map), params, request.strength, callback, progress)
    if request.mask is None:
        return pipe.img2img_latents(pixels, params, request.strength, callback, progress)
    mask = mask_tensor(request.mask, pixels.shape[-1], pixels.shape[-2])
    return pipe.inpaint_latents(pixels, mask, params, request.strength, callback, progress)


def _handoff(pipe, params, fraction: float) -> int:
    from sdtorch.sampling.schedulers import handoff_index

    schedule = params.schedule(pipe.config.schedule)
    return handoff_index(*samplers.resolve(params.sampler, params.scheduler), params.steps, schedule, fraction)


class _Stop(Exception):
    def __init__(self, step: int, latents: torch.Tensor):
        super().__init__(f"interrupted after step {step}")
        self.step, self.latents = step, latents


def _params(pipe, r: GenerationRequest, pixels: torch.Tensor | None):
    size = pipe.config.sample_size
    f = pipe.vae.downscale
    if r.init_latents is not None:
        size_h, size_w = (n * f for n in r.init_latents.shape[-2:])
    else:
        size_h, size_w = pixels.shape[-2:] if pixels is not None else (r.height or size, r.width or size)
    sampler, scheduler = samplers.resolve(r.sampler, r.scheduler)
    if scheduler == "karras" and f"{sampler}_karras" in samplers.ALIASES:  # the combined name, as 0.1 wrote it
        sampler, scheduler = f"{sampler}_karras", "automatic"
    return GenerationParams(r.prompt, r.negative_prompt, r.steps, sampler, r.cfg_scale, r.seed, size_w, size_h,
                            r.batch_size, r.eta, r.clip_skip, scheduler=scheduler, seed_mode=r.seed_mode,
                            subseed=r.subseed, subseed_strength=r.subseed_strength,
                            seed_resize_from=tuple(r.seed_resize_from), condition=r.condition,
                            micro=r.micro, negative_micro=r.negative_micro, extra=_extra(r),
                            controls=tuple(r.controls), timestep_spacing=r.timestep_spacing)


def _merger(pipe, r: GenerationRequest, params) -> TokenMerger | None:
    if not r.token_merging_ratio:
        return None
    f, (max_downsample, sx, sy) = pipe.vae.downscale, r.tome_options
    return TokenMerger(r.token_merging_ratio, (params.height // f, params.width // f), max_downsample=max_downsample,
                       sx=sx, sy=sy, generator=torch.Generator().manual_seed(r.seed))


def _extra(r: GenerationRequest) -> dict:
    import hashlib

    extra = {"Tiling": True} if r.tiling else {}
    if r.timestep_spacing is not None:
        extra["Timestep spacing"] = r.timestep_spacing
    if r.token_merging_ratio:
        extra["Token merging ratio"] = r.token_merging_ratio
    if r.condition is not None:  # which input, by content (the tensor itself is not text)
        data = r.condition.detach().float().contiguous().numpy().tobytes()
        extra["Condition hash"] = hashlib.sha256(data).hexdigest()[:10]
    if r.layout is not None:
        from sdtorch.generate.concat import layout_tensor

        extra["Layout hash"] = hashlib.sha256(layout_tensor(r.layout).numpy().tobytes()).hexdigest()[:10]
    return extra


def _pixels(r: GenerationRequest) -> torch.Tensor | None:
    """The init image at the requested size, or its own size rounded down to a multiple of 8 (a
    (1, 3, H, W) tensor in [-1, 1] passes as it is)."""
    if r.init_image is None:
        return None
    if isinstance(r.init_image, torch.Tensor):
        return image_tensor(r.init_image)
    w, h = r.init_image.size
    return image_tensor(r.init_image, r.width or w - w % 8, r.height or h - h % 8)


def _callback(on_step: OnStep | None, cancel: CancelToken | None, total: int, raw: Callable | None = None):
    count = [0]

    def callback(d: dict) -> None:
        if cancel is not None and cancel.cancelled:
            if cancel.keep:  # this step's denoised estimate is the result
                raise _Stop(count[0], d["denoised"])
            raise Cancelled(f"cancelled at step {count[0]} of {total}")
        count[0] += 1
        if raw is not None:
            raw(d)
        if on_step is not None:
            on_step(count[0], total, d["denoised"])

    return callback


@contextmanager
def _scoped(pipe, r: GenerationRequest):
    """Apply the request's pipeline-level settings; restore the previous ones afterwards."""
    if r.decoder == "tiny" and pipe.tiny_decoder is None:
        raise RequestError("decoder", "decoder 'tiny' needs a tiny decoder loaded "
                           "(sdtorch.generate.loading.load_tiny_decoder, --tiny-decoder)")
    saved = (pipe.prompt_syntax, pipe.deep_cache, pipe.tile_vae, pipe.attention_chunk, pipe.decoder)
    applied = []
    try:
        pipe.decoder = r.decoder
        pipe.prompt_syntax = r.prompt_syntax
        pipe.deep_cache = (r.deep_cache, r.deep_cache_branch) if r.deep_cache > 1 else None
        pipe.tile_vae = r.tile_vae if r.tile_vae is not None else saved[2]
        pipe.attention_chunk = r.attention_chunk
        for name, strength in r.loras:
            applied.append(pipe.loras.add(_network(pipe, _lora_path(pipe, name)), strength))
        with seamless(pipe.unet, pipe.vae, enabled=r.tiling):
            yield
    finally:
        for a in applied:
            pipe.loras.remove(a)
        pipe.prompt_syntax, pipe.deep_cache, pipe.tile_vae, pipe.attention_chunk, pipe.decoder = saved


def _network(pipe, path):
    """A LoRA file's network, read once per pipeline (again only when the file changes)."""
    from sdtorch.adapters import lora

    st = path.stat()
    key = (path.resolve(), st.st_size, st.st_mtime_ns)
    if key not in pipe.lora_cache:
        pipe.lora_cache[key] = lora.load(path, pipe.unet, pipe.clip, dtype=pipe.dtype, device=pipe.device,
                                          clip2=pipe.clip2)
    return pipe.lora_cache[key]


def _lora_path(pipe, name: str):
    from pathlib import Path

    from sdtorch.adapters.lora import resolve_lora

    if Path(name).is_file():
        return Path(name)
    directory = getattr(pipe.lora_loader, "directory", None)
    if directory is None:
        raise RequestError("loras", f"LoRA {name!r} is not a file and no LoRA directory was given")
    try:
        return resolve_lora(name, directory)
    except (FileNotFoundError, ValueError) as e:
        raise RequestError("loras", str(e)) from None
