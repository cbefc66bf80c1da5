"""Image-conditioned UNets beyond inpainting: instruct-pix2pix (8 channels) and depth-to-image (5),
against diffusers' StableDiffusionInstructPix2PixPipeline and StableDiffusionDepth2ImgPipeline on
the same random weights, and the requests they refuse."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import _reference
from PIL import Image
from safetensors.torch import save_file
from reference_models import reference_scheduler
from test_img2img import params, picture, rel_err, square_mask

import sdtorch
from sdtorch.config import TINY
from sdtorch.formats import checkpoint
from sdtorch.formats.files import read_state_dict
from sdtorch.families import describe
from sdtorch.generate.concat import depth_latents, edit_latents, upscale_latents
from sdtorch.generate.images import image_tensor
from sdtorch.generate.request import GenerationRequest, RequestError

SAMPLERS = ["euler", "euler_a", "ddim", "dpmpp_2m"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def depth_map() -> torch.Tensor:
    """(1, H, W): a slanted plane with a nearer disc, in MiDaS-like units (larger = nearer)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    disc = ((x - 0.4) ** 2 + (y - 0.5) ** 2 < 0.06).float()
    return (3 + 5 * y + 10 * disc)[None]


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    cfg = replace(TINY, name="tiny-pix2pix", unet=replace(TINY.unet, in_channels=8))
    gen = _reference(tmp_path_factory, cfg, seed=31)
    ref = next(gen)
    assert checkpoint.read(ref.checkpoint).config.unet.in_channels == 8  # detected from the keys
    theirs = StableDiffusionInstructPix2PixPipeline.from_pretrained(ref.folder, local_files_only=True,
                                                                    safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    yield sdtorch.load(ref.checkpoint, config=ref.preset), theirs
    next(gen, None)


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    from diffusers import StableDiffusionDepth2ImgPipeline

    cfg = replace(TINY, name="tiny-depth", unet=replace(TINY.unet, in_channels=5))
    gen = _reference(tmp_path_factory, cfg, seed=32)
    ref = next(gen)
    sd, _ = read_state_dict(ref.checkpoint)  # real depth files also carry the MiDaS estimator: read past it
    with_estimator = ref.checkpoint.with_name("with_midas.safetensors")
    save_file({**sd, "depth_model.model.pretrained.model.cls_token": torch.zeros(1, 1, 8)}, str(with_estimator))
    assert checkpoint.read(with_estimator).config.unet.in_channels == 5
    theirs = StableDiffusionDepth2ImgPipeline.from_pretrained(ref.folder, local_files_only=True, depth_estimator=None,
                                                              feature_extractor=None)
    theirs.set_progress_bar_config(disable=True)
    yield sdtorch.load(ref.checkpoint, config=ref.preset), theirs
    next(gen, None)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("image_cfg", [1.5, 0.5])
@torch.no_grad()
def test_instruct_pix2pix_matches_diffusers(pix2pix, sampler, image_cfg, parity_log):
    ours, theirs = pix2pix
    assert describe(ours.config).endswith("instruct-pix2pix")  # detected from the 8-channel UNet
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    p = params(sampler)
    a = edit_latents(ours, image_tensor(picture()), p, 1.0, image_cfg)
    b = theirs(p.prompt, image=picture(), negative_prompt=p.negative_prompt, num_inference_steps=p.steps,
               guidance_scale=p.cfg_scale, image_guidance_scale=image_cfg, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").images
    assert parity_log("tiny instruct-pix2pix latents rel_err", rel_err(a, b)) <= 1e-4
    images = ours.decode(a)
    ref = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert parity_log("tiny instruct-pix2pix image PSNR", psnr(images, ref), worst=min) >= 45


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("strength", [0.8, 1.0])
@torch.no_grad()
def test_depth_to_image_matches_diffusers(depth, sampler, strength, parity_log):
    ours, theirs = depth
    assert describe(ours.config).endswith("depth")
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    p = params(sampler)
    a = depth_latents(ours, image_tensor(picture()), depth_map(), p, strength)
    b = theirs(p.prompt, image=picture(), depth_map=depth_map(), strength=strength, negative_prompt=p.negative_prompt,
               num_inference_steps=p.steps, guidance_scale=p.cfg_scale, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").images
    assert parity_log("tiny depth2img latents rel_err", rel_err(a, b)) <= 1e-4
    images = ours.decode(a)
    ref = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert parity_log("tiny depth2img image PSNR", psnr(images, ref), worst=min) >= 45


def test_requests_and_what_they_refuse(pix2pix, depth):
    (edit, _), (deep, _) = pix2pix, depth
    common = dict(steps=3, sampler="euler", scheduler="automatic", seed=4, width=64, height=64)
    one = edit.run(GenerationRequest("make it blue", init_image=picture(), strength=1.0, image_cfg_scale=1.2, **common))
    assert "Image CFG scale: 1.2" in one.infotexts[0]
    two = edit.run(GenerationRequest("make it blue", init_image=picture(), strength=1.0, image_cfg_scale=2.0, **common))
    assert np.abs(np.asarray(one.images[0], np.int16) - np.asarray(two.images[0], np.int16)).max() > 0
    grey = Image.fromarray((depth_map()[0] * 10).numpy().astype(np.uint8))  # a depth map as a picture
    from_image = deep.run(GenerationRequest("a room", init_image=picture(), depth_map=grey, **common))
    assert from_image.images[0].size == (64, 64)

    with pytest.raises(RequestError, match="give an init image"):
        edit.run(GenerationRequest("make it blue", **common))
    with pytest.raises(RequestError, match="no depth estimator"):
        deep.run(GenerationRequest("a room", init_image=picture(), **common))
    with pytest.raises(RequestError, match="give an init image"):
        deep.run(GenerationRequest("a room", **common))
    with pytest.raises(RequestError, match="does not inpaint"):
        deep.run(GenerationRequest("a room", init_image=picture(), mask=square_mask(), depth_map=grey, **common))
    with pytest.raises(RequestError, match="depth-to-image models"):
        edit.run(GenerationRequest("a room", init_image=picture(), depth_map=grey, **common))
    with pytest.raises(RequestError, match="depth_map must be"):
        GenerationRequest("a room", init_image=picture(), depth_map="depth.png").validate()
    with pytest.raises(ValueError, match="not supported with instruct-pix2pix"):
        edit.run(GenerationRequest("[a cat:a dog:2]", init_image=picture(), strength=1.0, **common))


def test_command_line_edit_and_depth(pix2pix, depth, tmp_path, capsys):
    from sdtorch.cli import main

    picture().save(tmp_path / "in.png")
    Image.fromarray((depth_map()[0] * 10).numpy().astype(np.uint8)).save(tmp_path / "depth.png")
    files = {}
    for name, (pipe, _) in (("edit", pix2pix), ("depth", depth)):
        files[name] = checkpoint.save(tmp_path / f"{name}.safetensors", pipe.unet, pipe.vae, pipe.clip, pipe.config)
    common = ["--steps", "3", "--seed", "2", "--sampler", "euler"]
    assert main(["img2img", str(tmp_path / "in.png"), "make it blue", "-c", str(files["edit"]), "--strength", "1",
                 "--image-cfg", "1.3", *common, "--out", str(tmp_path / "a")]) == 0
    out, = (tmp_path / "a").glob("*.png")
    assert "Image CFG scale: 1.3" in Image.open(out).info["parameters"]
    assert main(["img2img", str(tmp_path / "in.png"), "a room", "-c", str(files["depth"]), "--depth",
                 str(tmp_path / "depth.png"), *common, "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "b").glob("*.png"))) == 1
    assert main(["img2img", str(tmp_path / "in.png"), "a room", "-c", str(files["depth"]), *common]) == 2  # no map
    assert "no depth estimator weights" in capsys.readouterr().err


# --- the SD x4 upscaler ------------------------------------------------------------------------

# Shaped like stabilityai/stable-diffusion-x4-upscaler in miniature: 7 input channels, the noise
# level as one of 1000 classes, attn1 cross-attending on all but the deepest level, fixed head
# count, linear projections, OpenCLIP-layout text encoder, a 3-level VAE (4x) with scale 0.08333,
# v-prediction on betas 1e-4..0.02.
TINY_X4 = replace(
    TINY, name="tiny-x4", clip_layout="openclip", prediction="v",
    clip=replace(TINY.clip, layers=3, act="gelu", pad_token_id=0, clip_skip=2),
    unet=replace(TINY.unet, in_channels=7, channel_mult=(1, 2, 2), attention_resolutions=(4, 2),
                 use_linear_in_transformer=True, num_classes=1000, disable_self_attentions=(True, True, False)),
    vae=replace(TINY.vae, ch_mult=(1, 2, 2), scaling_factor=0.08333),
    schedule=replace(TINY.schedule, beta_start=0.0001, beta_end=0.02),
)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    gen = _reference(tmp_path_factory, TINY_X4, seed=33)
    ref = next(gen)
    f = ref.folder
    theirs = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL.from_pretrained(f / "vae"), text_encoder=CLIPTextModel.from_pretrained(f / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(f / "tokenizer"), unet=UNet2DConditionModel.from_pretrained(f / "unet"),
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDPMScheduler.from_pretrained(f / "scheduler"), max_noise_level=350)
    theirs.set_progress_bar_config(disable=True)
    yield sdtorch.load(ref.checkpoint, config=TINY_X4), theirs, ref
    next(gen, None)


def low_res() -> Image.Image:
    return picture(16)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("noise_level", [20, 100])
@torch.no_grad()
def test_x4_upscaler_matches_diffusers(upscaler, sampler, noise_level, parity_log):
    ours, theirs, _ = upscaler
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    p = replace(params(sampler), width=64, height=64)
    a = upscale_latents(ours, image_tensor(low_res()), p, noise_level)
    b = theirs(p.prompt, image=low_res(), negative_prompt=p.negative_prompt, num_inference_steps=p.steps,
               guidance_scale=p.cfg_scale, noise_level=noise_level, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").images
    assert a.shape == (2, 4, 16, 16)
    assert parity_log("tiny x4 upscaler latents rel_err", rel_err(a, b)) <= 1e-4
    images = ours.decode(a)
    ref = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape[-2:] == (64, 64)
    assert parity_log("tiny x4 upscaler image PSNR", psnr(images, ref), worst=min) >= 45


def test_x4_upscaler_file_is_detected_and_requested(upscaler):
    ours, _, ref = upscaler
    detected = checkpoint.read(ref.checkpoint).config
    u = detected.unet
    # level 0 has no attention, so its flag means nothing and a file cannot tell it
    assert (u.in_channels, u.num_classes, u.disable_self_attentions[1:]) == (7, 1000, (True, False))
    assert detected.prediction == "v" and detected.vae.scaling_factor == 0.08333
    assert (detected.schedule.beta_start, detected.schedule.beta_end) == (0.0001, 0.02)
    assert describe(detected) == "custom (tiny-x4) x4-upscaler"
    real = replace(detected, unet=replace(u, context_dim=1024, model_channels=256))  # the real one's widths
    assert describe(real) == "SD 2.x x4-upscaler"
    common = dict(steps=3, sampler="euler", scheduler="automatic", seed=4)
    out = ours.run(GenerationRequest("a photo", init_image=low_res(), noise_level=30, **common))
    assert out.images[0].size == (64, 64) and "Noise level: 30" in out.infotexts[0] and "Size: 64x64" in out.infotexts[0]
    with pytest.raises(RequestError, match="upscales an image"):
        ours.run(GenerationRequest("a photo", **common))
    with pytest.raises(RequestError, match="noise_level"):
        GenerationRequest("a photo", init_image=low_res(), noise_level=400).validate()


def test_real_x4_upscaler_architecture_is_detected_from_its_keys():
    """The real upscaler's UNet and VAE built by diffusers from our config (on the meta device: shapes
    only), renamed to the original layout: detection gives the config back, and diffusers' own
    single-file code recognises the keys as the upscaler's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from sdtorch.config import SD_X4_UPSCALER as X4
    from sdtorch.formats import diffusers as convert
    from sdtorch.formats.diffusers_config import diffusers_configs

    cfgs = diffusers_configs(X4)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**cfgs["unet"]), AutoencoderKL(**cfgs["vae"])
    unet_sd = convert.unet_from_diffusers(unet.state_dict(), X4.unet)
    detected = checkpoint.detect_unet(unet_sd)
    assert replace(detected, disable_self_attentions=X4.unet.disable_self_attentions) == X4.unet
    assert detected.disable_self_attentions[1:] == (True, True, False)  # level 0 has no attention to tell
    assert checkpoint.detect_vae(convert.vae_from_diffusers(vae.state_dict(), X4.vae)).ch_mult == (1, 2, 4)
    keys = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    assert infer_diffusers_model_type(keys) == "upscale"


def test_command_line_upscale(upscaler, tmp_path):
    from sdtorch.cli import main

    ours, _, _ = upscaler
    path = checkpoint.save(tmp_path / "x4.safetensors", ours.unet, ours.vae, ours.clip, ours.config)
    low_res().save(tmp_path / "small.png")
    assert main(["upscale", str(tmp_path / "small.png"), "a photo", "-c", str(path), "--steps", "3", "--seed", "1",
                 "--noise-level", "40", "--out", str(tmp_path / "out")]) == 0
    out, = (tmp_path / "out").glob("*.png")
    image = Image.open(out)
    assert image.size == (64, 64) and "Noise level: 40" in image.info["parameters"]


def test_server_hires_fix_with_an_x4_upscaler_model(upscaler, tmp_path):
    """An x4 upscaler in --models-dir is offered as an upscaler and used as hr_upscaler (the same
    image as the Python API's hires fix with that model) and as the Extras tab's upscaler_1."""
    from fastapi.testclient import TestClient
    from test_serve import make_service, png_b64

    from sdtorch.generate.hires import HiresFix
    from sdtorch.serve.app import create_app

    ours, _, _ = upscaler
    models = tmp_path / "models"
    models.mkdir()
    checkpoint.save(models / "x4.safetensors", ours.unet, ours.vae, ours.clip, ours.config)
    service = make_service(tmp_path / "data", models_dir=str(models))
    try:
        with TestClient(create_app(service)) as client:
            names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
            assert names == ["None", "Lanczos", "Nearest", "x4"]
            body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
                    "enable_hr": True, "hr_scale": 2, "hr_upscaler": "x4", "denoising_strength": 0.5}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            bad = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "x8"})
            assert bad.status_code == 422 and "x4" in bad.json()["detail"]
            extras = client.post("/sdapi/v1/extra-single-image",
                                 json={"image": png_b64(low_res()), "upscaler_1": "x4", "upscaling_resize": 4})
            assert extras.status_code == 200, extras.text
    finally:
        service.stop()
    import base64
    import io

    from sdtorch.generate.hires import model_upscale

    upscaled = Image.open(io.BytesIO(base64.b64decode(extras.json()["image"])))
    assert upscaled.size == (64, 64) and upscaled.info["postprocessing"].endswith("Postprocess upscaler: x4")
    assert np.array_equal(np.asarray(upscaled), np.asarray(model_upscale(ours, low_res())))
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert got.size == (128, 128) and "Hires upscaler: x4" in got.info["parameters"]
    builtin = sdtorch.load()
    fix = HiresFix(scale=2, upscaler="x4", strength=0.5, model=ours)
    want = builtin.run(GenerationRequest("a red apple", steps=2, width=64, height=64, seed=3, sampler="euler",
                                         scheduler="automatic", cfg_scale=7.0, seed_mode="a1111", hires=fix)).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
