"""AUTOMATIC1111's txt2img / img2img request bodies (1.10 field names and defaults) as pydantic
models, and their translation into sdtorch `GenerationRequest`s.

Every field is either honoured or, set to a value sdtorch cannot honour, refused with a
`RequestError` naming it (the server answers 422). Fields that A1111 itself ignores in a given
situation (eta for a sampler without noise, hr_* without enable_hr, image_cfg_scale for a model
that is not instruct-pix2pix) are ignored here the same way. Unknown fields are refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdtorch.generate import GenerationRequest, RequestError
from sdtorch.sampling import samplers
from sdtorch.serve import controlnet as cn
from sdtorch.serve import images as imgs


class _Common(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing + API extras)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None  # A1111: 512; here None = the loaded model's native size
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict | None = None
    token_merging_ratio: float | None = None
    token_merging_ratio_hr: float | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}
    infotext: str | None = None


class Txt2Img(_Common):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2Img(_Common):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


KINDS = {"txt2img": Txt2Img, "img2img": Img2Img}

# Options a request's override_settings (and POST /sdapi/v1/options) may set.
OVERRIDABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048  # width x height x batch_size
    max_steps: int = 150
    max_batch: int = 16
    max_iter: int = 16


@dataclass
class Plan:
    """What one A1111 request runs: one GenerationRequest per batch (n_iter of them), and how
    each result image is finished (inpainting: pasted back over the original)."""

    runs: list[GenerationRequest]
    finish: Callable[[Image.Image], Image.Image] = lambda im: im
    maps: list[Image.Image] = field(default_factory=list)  # ControlNet maps shown after the images


def parse(kind: str, body: dict) -> _Common:
    """Validate a request body into its pydantic model (raises pydantic.ValidationError)."""
    return KINDS[kind].model_validate(body)


def resolve_seeds(req: _Common) -> tuple[int, int]:
    """The request's seed and subseed, -1 replaced by random ones (stored with the job)."""
    return (req.seed if req.seed >= 0 else random.randrange(2**32),
            req.subseed if req.subseed >= 0 else random.randrange(2**32))


def plan(req: _Common, *, native: int, downscale: int, options: dict, limits: Limits, seed: int, subseed: int,
         lora_exists: Callable[[str], None] | None = None, styles: dict | None = None,
         seed_mode: str = "a1111", controlnet: Callable[[str], Any] | None = None,
         upscaler: Callable[[str], Any] | None = None) -> Plan:
    """The runs one A1111 request makes on a loaded model of native size `native` (pixels), with
    its resolved `seed` (batches get seed, seed + batch_size, ... as A1111 numbers them).
    `options` are the server's current options, updated by the request's override_settings;
    `controlnet(name)`, `upscaler(name)`: the loaded ControlNet a unit names, the x4 upscaler an
    hr_upscaler names (KeyError for an unknown one).
    Raises `RequestError` naming the first field it cannot honour."""
    _refuse_unsupported(req)
    opts = {**options, **_overrides(req)}
    width, height = req.width or native, req.height or native
    _check_limits(req, width, height, limits)
    sampler, scheduler = _sampler(req)
    prompt, negative = _styled(req, styles or {})
    base = GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=req.steps, sampler=sampler,
        scheduler=scheduler, cfg_scale=req.cfg_scale, seed=seed % 2**32,
        width=width, height=height, batch_size=req.batch_size, eta=_eta(req, sampler),
        clip_skip=_clip_skip(opts.get("CLIP_stop_at_last_layers", 1)), seed_mode=seed_mode, subseed=subseed % 2**32,
        subseed_strength=req.subseed_strength, seed_resize_from=_seed_resize(req, seed_mode), tiling=bool(req.tiling),
        token_merging_ratio=req.token_merging_ratio or 0.0)
    finish = lambda im: im  # noqa: E731
    if isinstance(req, Txt2Img) and req.enable_hr:
        base = replace(base, hires=_hires(req, upscaler))
        _, _, hw, hh = base.hires.target(width, height)
        if hw * hh * req.batch_size > limits.max_pixels:
            _refuse("hr_scale", f"the hires size {hw}x{hh}x{req.batch_size} is above this server's --max-pixels "
                                f"{limits.max_pixels}")
    if isinstance(req, Img2Img):
        base, finish = _img2img(req, base)
    base, maps = _controls(req, base, controlnet)
    try:
        base.validate(downscale)
    except RequestError as e:
        raise RequestError(_a1111_field(e.field), str(e)) from None
    if lora_exists is not None and not req.disable_extra_networks:
        _check_loras(prompt, lora_exists)
    if req.refiner_checkpoint and req.refiner_switch_at != 1:  # the worker attaches the loaded refiner
        base = replace(base, refiner_switch_at=req.refiner_switch_at or 0.8)
    return Plan([_replace_seed(base, i * req.batch_size) for i in range(req.n_iter)], finish, maps)


def _controls(req: _Common, base: GenerationRequest, controlnet: Callable[[str], Any] | None):
    """sd-webui-controlnet's units (`serve.controlnet`) as the request's ControlUnits."""
    args = cn.script_args(req.alwayson_scripts)
    if not args:
        return base, []

    def unknown(name: str):
        raise KeyError(f"unknown ControlNet model {name!r}; this server offers none (see --controlnet-dir)")

    init, mask = (base.init_image, base.mask) if isinstance(req, Img2Img) else (None, None)
    hires = isinstance(req, Txt2Img) and req.enable_hr
    got = cn.units(args, base.width, base.height, controlnet or unknown, init_image=init, init_mask=mask, hires=hires)
    return replace(base, controls=tuple(got.units)), got.maps


def _hires(req: Txt2Img, upscaler: Callable[[str], Any] | None = None):
    from sdtorch.generate.hires import UPSCALERS, HiresFix

    sampler = scheduler = ""
    if req.hr_sampler_name or req.hr_scheduler:
        try:
            sampler, scheduler = samplers.from_a1111(req.hr_sampler_name or req.sampler_name or req.sampler_index,
                                                     req.hr_scheduler or req.scheduler or "automatic")
        except ValueError as e:
            raise RequestError("hr_sampler_name", f"hr_sampler_name: {e}") from None
    model = None
    if req.hr_upscaler and req.hr_upscaler not in UPSCALERS and upscaler is not None:
        try:
            model = upscaler(req.hr_upscaler)
        except KeyError as e:
            raise RequestError("hr_upscaler", f"hr_upscaler: {e.args[0]} (built in: {', '.join(UPSCALERS)})") from None
    return HiresFix(model=model, scale=req.hr_scale, resize=(req.hr_resize_x, req.hr_resize_y),
                    upscaler=req.hr_upscaler or "Latent", steps=req.hr_second_pass_steps, strength=0.7 if req.denoising_strength is None else req.denoising_strength,
                    prompt=req.hr_prompt, negative_prompt=req.hr_negative_prompt, sampler=sampler, scheduler=scheduler)


def _styled(req: _Common, styles: dict) -> tuple[str, str]:
    from sdtorch.conditioning.styles import apply_styles

    if not req.styles:
        return req.prompt, req.negative_prompt
    if not styles:
        _refuse("styles", "this server has no styles (start it with --styles-file styles.csv)")
    try:
        return apply_styles(req.prompt, req.negative_prompt, req.styles, styles)
    except ValueError as e:
        raise RequestError("styles", f"styles: {e}") from None


def _replace_seed(r: GenerationRequest, offset: int) -> GenerationRequest:
    """Batch i of an n_iter request: seed and subseed moved on by i x batch_size (A1111)."""
    return replace(r, seed=(r.seed + offset) % 2**32, subseed=(r.subseed + offset) % 2**32)


def _seed_resize(req: _Common, seed_mode: str) -> tuple[int, int]:
    w, h = req.seed_resize_from_w, req.seed_resize_from_h
    if w <= 0 or h <= 0:
        return (0, 0)
    if seed_mode != "a1111":
        _refuse("seed_resize_from_w", "needs the server's --seed-mode a1111")
    return (w, h)


def _a1111_field(name: str) -> str:
    return {"sampler": "sampler_name", "strength": "denoising_strength", "init_image": "init_images",
            "clip_skip": "CLIP_stop_at_last_layers", "seed_resize_from": "seed_resize_from_w"}.get(name, name)


def _refuse(name: str, why: str) -> None:
    raise RequestError(name, f"{name}: {why}")


def _refuse_unsupported(req: _Common) -> None:
    """Fields whose non-default values sdtorch does not implement (yet): refused, never ignored."""
    if req.restore_faces:
        _refuse("restore_faces", "no face restoration model is available")
    for name, neutral in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", 0.0), ("s_noise", 1.0), ("s_min_uncond", 0.0)):
        v = getattr(req, name)
        if v is not None and v != neutral:
            _refuse(name, f"only the sampler's default ({neutral}) is supported, got {v}")
    if not 0 <= (req.token_merging_ratio or 0) < 1:
        _refuse("token_merging_ratio", f"must be in [0, 1), got {req.token_merging_ratio}")
    if req.token_merging_ratio_hr and req.token_merging_ratio_hr != req.token_merging_ratio:
        _refuse("token_merging_ratio_hr", "the hires pass merges tokens as the first pass does (token_merging_ratio)")
    if isinstance(req, Img2Img) and req.refiner_checkpoint:
        _refuse("refiner_checkpoint", "a refiner takes over txt2img runs only")
    if req.refiner_switch_at is not None and not 0 < req.refiner_switch_at <= 1:
        _refuse("refiner_switch_at", f"must be in (0, 1], got {req.refiner_switch_at}")
    if req.firstpass_image:
        _refuse("firstpass_image", "a given first-pass image is not supported")
    if req.script_name:
        _refuse("script_name", f"no script named {req.script_name!r} (this server has none)")
    if req.script_args:
        _refuse("script_args", "script arguments need a script_name")
    if isinstance(req, Txt2Img) and req.enable_hr and req.hr_checkpoint_name:
        _refuse("hr_checkpoint_name", "a second checkpoint for the hires pass is not supported")
    if isinstance(req, Txt2Img) and (req.firstphase_width or req.firstphase_height):
        _refuse("firstphase_width", "firstphase sizes belong to the old hires fix; use hr_scale / hr_resize_x")


def _overrides(req: _Common) -> dict:
    over = req.override_settings or {}
    for key in over:
        if key not in OVERRIDABLE:
            _refuse("override_settings", f"the option {key!r} cannot be set here (settable: {', '.join(OVERRIDABLE)})")
    return dict(over)


def _check_limits(req: _Common, width: int, height: int, limits: Limits) -> None:
    for name in ("steps", "batch_size", "n_iter", "width", "height"):
        v = getattr(req, name)
        if v is not None and v < 1:
            _refuse(name, f"must be >= 1, got {v}")
    if req.steps > limits.max_steps:
        _refuse("steps", f"{req.steps} is above this server's --max-steps {limits.max_steps}")
    if req.batch_size > limits.max_batch:
        _refuse("batch_size", f"{req.batch_size} is above this server's limit {limits.max_batch}")
    if req.n_iter > limits.max_iter:
        _refuse("n_iter", f"{req.n_iter} is above this server's limit {limits.max_iter}")
    if width * height * req.batch_size > limits.max_pixels:
        _refuse("width", f"width x height x batch_size = {width}x{height}x{req.batch_size} is above this "
                         f"server's --max-pixels {limits.max_pixels}")
    if req.cfg_scale != req.cfg_scale or abs(req.cfg_scale) > 100:
        _refuse("cfg_scale", f"must be a number in [-100, 100], got {req.cfg_scale}")


def _sampler(req: _Common) -> tuple[str, str]:
    name = req.sampler_name or req.sampler_index
    scheduler = req.scheduler or "automatic"
    try:
        return samplers.from_a1111(name, scheduler)
    except ValueError as e:
        if "scheduler" in str(e) or "schedule" in str(e):
            raise RequestError("scheduler", f"scheduler: {e}") from None
        raise RequestError("sampler_name", f"sampler_name: {e}") from None


def _eta(req: _Common, sampler: str) -> float:
    """DDIM takes eta (A1111's default for it: 0). Ancestral samplers run with eta 1 (A1111's
    default); other values are refused. Other samplers draw no noise, so eta means nothing."""
    if samplers.SAMPLERS[sampler].eta:
        return float(req.eta or 0.0)
    if sampler.startswith("euler_a") and req.eta is not None and req.eta != 1.0:
        _refuse("eta", f"the ancestral sampler runs with eta 1 only, got {req.eta}")
    return 0.0


def _clip_skip(value: Any) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
        _refuse("CLIP_stop_at_last_layers", f"must be an integer in 1..12, got {value!r}")
    return None if value == 1 else value  # 1: the model's own layer (SD2's penultimate)


def _check_loras(prompt: str, lora_exists: Callable[[str], None]) -> None:
    from sdtorch.conditioning.prompts import extract_loras

    try:
        names = [name for name, _ in extract_loras(prompt)[1]]
    except ValueError as e:
        raise RequestError("prompt", f"prompt: {e}") from None
    for name in names:
        try:
            lora_exists(name)
        except (FileNotFoundError, ValueError) as e:
            raise RequestError("prompt", f"prompt: {e}") from None


def _img2img(req: Img2Img, base: GenerationRequest) -> tuple[GenerationRequest, Callable]:
    if not req.init_images:
        _refuse("init_images", "img2img needs one image in init_images")
    if len(req.init_images) > 1:
        _refuse("init_images", f"one init image per request is supported, got {len(req.init_images)}")
    if req.resize_mode not in imgs.RESIZE_MODES:
        _refuse("resize_mode", f"must be one of {sorted(imgs.RESIZE_MODES)} "
                               f"(0 just resize, 1 crop and resize, 2 resize and fill), got {req.resize_mode}")
    if req.initial_noise_multiplier not in (None, 1.0):
        _refuse("initial_noise_multiplier", f"only 1.0 is supported, got {req.initial_noise_multiplier}")
    if req.latent_mask:
        _refuse("latent_mask", "a separate latent mask is not supported")
    if not 0.0 <= req.denoising_strength <= 1.0:
        _refuse("denoising_strength", f"must be in [0, 1], got {req.denoising_strength}")
    init = imgs.decode_image(req.init_images[0], "init_images[0]")
    size = (base.width, base.height)
    if req.mask is None:
        image = imgs.resize(init.convert("RGB"), size, req.resize_mode)
        return replace(base, init_image=image, strength=req.denoising_strength,  # image CFG: instruct-pix2pix models
                       image_cfg_scale=1.5 if req.image_cfg_scale is None else req.image_cfg_scale), lambda im: im
    if req.inpainting_fill not in (0, 1):
        _refuse("inpainting_fill", f"0 (fill) and 1 (original) are supported, got {req.inpainting_fill}")
    if req.inpainting_mask_invert not in (0, 1):
        _refuse("inpainting_mask_invert", f"must be 0 or 1, got {req.inpainting_mask_invert}")
    mask = imgs.decode_image(req.mask, "mask")
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    job = imgs.Inpaint.prepare(init.convert("RGB"), mask, size=size, resize_mode=req.resize_mode, blur=blur,
                               invert=bool(req.inpainting_mask_invert), fill=req.inpainting_fill == 0,
                               only_masked=req.inpaint_full_res, padding=req.inpaint_full_res_padding)
    return replace(base, init_image=job.image, mask=job.mask, strength=req.denoising_strength), job.paste
