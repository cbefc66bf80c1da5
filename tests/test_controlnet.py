"""ControlNet models and files: the residuals of diffusers' `ControlNetModel` on the same random
weights (SD 1 and SDXL shapes, tiny), from a diffusers folder, from the original `control_model.*`
layout (converted here and read back by diffusers' own single-file loader) and from a
diffusers-keyed single file; wrong files and wrong families refused."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdtorch.conditioning.preprocess import preprocess
from sdtorch.config import TINY, TINY_XL
from sdtorch.formats import controlnet as cn_format
from sdtorch.formats.diffusers_config import diffusers_configs
from sdtorch.formats.files import CheckpointError

EMBED = (16, 32, 96, 256)  # the hint encoder's widths (the real ones: 8x down to the latents)
EMBED_DOWN = 2 ** (len(EMBED) - 1)  # the control image is this many times the latents


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def reference_controlnet(preset, seed: int = 0, embed: tuple[int, ...] = EMBED):
    """diffusers' ControlNetModel copied from a random UNet of the preset, with its zero-initialised
    layers (hint output, zero convolutions) made random so that every residual carries signal."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**diffusers_configs(preset)["unet"])
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(preset, batch: int = 2):
    g = torch.Generator().manual_seed(7)
    side = 16  # latent side
    x = torch.randn(batch, 4, side, side, generator=g)
    hint = torch.rand(batch, 3, side * EMBED_DOWN, side * EMBED_DOWN, generator=g)
    t = torch.tensor([500.0] * batch)
    context = torch.randn(batch, 77, preset.unet.context_dim, generator=g)
    y = torch.randn(batch, preset.unet.adm_in_channels, generator=g) if preset.unet.adm_in_channels else None
    return x, hint, t, context, y


def _theirs(model, x, hint, t, context, y, preset):
    kw = {}
    if y is not None:  # SDXL: the vector is the pooled text followed by the size features
        pooled = preset.clip2.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": y[:, :pooled], "time_ids": torch.zeros(x.shape[0], 6)}
    with torch.no_grad():
        down, mid = model(x, t, context, hint, return_dict=False, **kw)
    return [*down, mid]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def reference(request, tmp_path_factory):
    preset = {"sd1": TINY, "sdxl": TINY_XL}[request.param]
    model = reference_controlnet(preset)
    folder = tmp_path_factory.mktemp(f"cn-{request.param}") / "diffusers"
    model.save_pretrained(folder)
    return preset, model, folder


def test_residuals_match_diffusers_from_every_layout(reference, tmp_path, parity_log):
    preset, theirs, folder = reference
    x, hint, t, context, y = _inputs(preset)
    if y is not None:  # diffusers embeds the six size numbers itself: give it zeros and us their features
        from diffusers.models.embeddings import get_timestep_embedding

        feats = get_timestep_embedding(torch.zeros(x.shape[0] * 6), preset.micro_dim, True, 0).reshape(x.shape[0], -1)
        y = torch.cat([y[:, : preset.clip2.projection_dim], feats], dim=1)
    expected = _theirs(theirs, x, hint, t, context, y, preset)

    original = cn_format.from_diffusers(theirs.state_dict(), cn_format.detect_diffusers(theirs.state_dict()))
    pth = tmp_path / "control_tiny.pth"
    torch.save({f"control_model.{k}": v for k, v in original.items()}, pth)
    bare = tmp_path / "control_bare.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, bare)
    keyed = tmp_path / "diffusers_keys.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, keyed)
    for source in (folder, pth, bare, keyed):
        ours = cn_format.load(source, preset.unet)
        with torch.no_grad():
            got = ours(x, hint, t, context, y)
        assert len(got) == len(expected)
        worst = max(rel_err(a, b) for a, b in zip(got, expected))
        parity_log(f"controlnet {preset.name} residuals ({Path(source).name})", worst)
        assert worst <= 1e-5, (source, worst)


def test_original_file_reads_back_in_diffusers(reference, tmp_path):
    from diffusers import ControlNetModel

    preset, theirs, folder = reference
    original = cn_format.from_diffusers(theirs.state_dict(), cn_format.detect_diffusers(theirs.state_dict()))
    cfg = cn_format.detect(original, preset.unet)
    assert cn_format.to_diffusers(original, cfg).keys() == theirs.state_dict().keys()
    if preset.unet.adm_in_channels:
        pytest.skip("diffusers' single-file ControlNet converter has no rule for SDXL's label_emb "
                    "(it leaves add_embedding unloaded); the round trip above is what is checked")
    path = tmp_path / "control.safetensors"
    save_file({f"control_model.{k}": v.contiguous() for k, v in original.items()}, path)
    back = ControlNetModel.from_single_file(path, config=str(folder), local_files_only=True)
    ref = theirs.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_wrong_family_and_wrong_files_are_refused(tmp_path):
    sd1 = reference_controlnet(TINY)
    folder = tmp_path / "sd1"
    sd1.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="cannot control this"):
        cn_format.load(folder, TINY_XL.unet)
    with pytest.raises(CheckpointError, match="not found"):
        cn_format.load(tmp_path / "missing.safetensors", TINY.unet)
    unet_file = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, unet_file)
    with pytest.raises(CheckpointError, match="not a ControlNet.*Stable Diffusion checkpoint"):
        cn_format.load(unet_file, TINY.unet)
    with pytest.raises(ValueError, match="control image is 10x10"):
        model = cn_format.load(folder, TINY.unet)
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 10, 10), torch.tensor([1.0]), torch.zeros(1, 77, 32))


# --- in the pipeline, against diffusers' StableDiffusionControlNetPipeline --------------------------

PROMPT, NEGATIVE = "a red apple on a table", "blurry"


@pytest.fixture(scope="module")
def controlled(tiny_reference, tmp_path_factory):
    """The tiny SD1 model (VAE downscale 2) in both libraries and two ControlNets whose hint
    encoders downscale by 2 too, each as a diffusers folder and loaded by sdtorch."""
    import sdtorch

    root = tmp_path_factory.mktemp("cn-pipe")
    nets = []
    for k in range(2):
        theirs = reference_controlnet(TINY, seed=10 + k, embed=(16, 32))
        theirs.save_pretrained(root / f"cn{k}")
        nets.append((theirs, cn_format.load(root / f"cn{k}", TINY.unet)))
    return sdtorch.load(tiny_reference.checkpoint, config=tiny_reference.preset), tiny_reference.folder, nets


def _hints(n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(1, 3, 64, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("case", ["one", "two", "guess"])
def test_controlnet_txt2img_matches_diffusers(controlled, case, parity_log):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    from sdtorch.adapters.control import ControlUnit
    from sdtorch.generate.request import GenerationRequest

    ours, folder, nets = controlled
    hints = _hints(2)
    units = {"one": [dict(weight=0.8)], "guess": [dict(weight=1.0, mode="guess")],
             "two": [dict(weight=0.8, start=0.0, end=0.7), dict(weight=0.5, start=0.3, end=1.0)]}[case]
    used = nets[: len(units)]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=[n[0] for n in used] if len(used) > 1 else used[0][0], safety_checker=None,
        requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    one = len(used) == 1
    kw = dict(controlnet_conditioning_scale=units[0]["weight"] if one else [u["weight"] for u in units],
              control_guidance_start=units[0].get("start", 0.0) if one else [u["start"] for u in units],
              control_guidance_end=units[0].get("end", 1.0) if one else [u["end"] for u in units],
              guess_mode=case == "guess")
    theirs = pipe(PROMPT, image=hints[0] if one else hints[: len(used)], negative_prompt=NEGATIVE,
                  num_inference_steps=6, guidance_scale=7.5, height=64, width=64, num_images_per_prompt=2,
                  generator=torch.Generator("cpu").manual_seed(1234), output_type="pt", **kw).images
    controls = tuple(ControlUnit(n[1], h, **u) for n, h, u in zip(used, hints, units))
    request = GenerationRequest(PROMPT, NEGATIVE, steps=6, sampler="euler", scheduler="automatic", seed=1234,
                                width=64, height=64, batch_size=2, prompt_syntax="plain", controls=controls)
    got = torch.stack([_tensor(im) for im in ours.run(request).images])
    plain = _tensor(ours.run(replace(request, controls=())).images[0])
    mse = (got - theirs.float()).pow(2).mean().item()
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    parity_log(f"controlnet txt2img {case} PSNR (8-bit images)", psnr, worst=min)
    assert psnr >= 45, psnr
    assert (got[0] - plain).abs().max() > 0.01  # the control changed the image


def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_bad_control_requests_are_refused(controlled):
    from sdtorch.adapters.control import ControlUnit, control_image
    from sdtorch.generate.request import GenerationRequest, RequestError

    ours, _, nets = controlled
    hint = _hints(1)[0]
    for bad, match in ((dict(start=0.8, end=0.2), "guidance window"), (dict(mode="loud"), "control mode"),
                       (dict(resize="zoom"), "resize mode")):
        with pytest.raises(RequestError, match=match):
            GenerationRequest(PROMPT, controls=(ControlUnit(nets[0][1], hint, **bad),)).validate()
    with pytest.raises(RequestError, match="controls must be ControlUnits"):
        GenerationRequest(PROMPT, controls=("canny.pth",)).validate()
    # a control image of another size is resized per resize mode
    wide = torch.rand(1, 3, 32, 128)
    assert control_image(wide, 64, 64, "crop").shape[-2:] == (64, 64)
    filled = control_image(wide, 64, 64, "fill")
    assert filled.shape[-2:] == (64, 64) and filled[..., :8, :].abs().max() == 0  # black bars above and below
    assert control_image(wide, 64, 64, "just").shape[-2:] == (64, 64)


def test_cli_generate_with_a_controlnet_and_canny(tiny_file, tmp_path):
    from PIL import Image, ImageDraw

    from sdtorch.cli import main

    net = reference_controlnet(TINY, seed=20, embed=(16, 32))
    net.save_pretrained(tmp_path / "control_tiny")
    source = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(source).ellipse((20, 10, 70, 55), fill="black")
    source.save(tmp_path / "shape.png")
    base = [str(tiny_file), "--steps", "3", "--seed", "5", "--sampler", "euler", "--width", "64", "--height", "64"]
    common = ["generate", "a ball", "-c", *base]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "cn"), "--control", f"{tmp_path / 'control_tiny'}:{tmp_path / 'shape.png'}:0.9",
                 "--control-preprocess", "canny"]) == 0
    plain, = (tmp_path / "plain").glob("*.png")
    cn, = (tmp_path / "cn").glob("*.png")
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in (plain, cn))
    assert np.abs(a - b).max() > 5  # the ControlNet acted
    edges = np.asarray(preprocess("canny", source))
    assert edges.max() == 255 and (edges == 0).mean() > 0.8  # an outline, not a filled shape
    assert main([*common, "--control", f"{tmp_path / 'missing'}:{tmp_path / 'shape.png'}"]) == 2
    assert main([*common, "--control", f"{tmp_path / 'control_tiny'}:{tmp_path / 'shape.png'}",
                 "--control-preprocess", "depth_midas"]) == 2
    # an inpaint ControlNet: the mask from --control-mask, or the inpaint command's --mask
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "white.png")
    spec = f"{tmp_path / 'control_tiny'}:{tmp_path / 'white.png'}"
    assert main([*common, "--control", spec, "--control-preprocess", "inpaint"]) == 2  # no mask
    assert main([*common, "--out", str(tmp_path / "cn_inpaint"), "--control", spec, "--control-preprocess", "inpaint",
                 "--control-mask", str(tmp_path / "mask.png")]) == 0
    assert main(["inpaint", str(tmp_path / "white.png"), "a ball", "--mask", str(tmp_path / "mask.png"), "-c",
                 *base[:-4], "--out", str(tmp_path / "inpaint"), "--control", spec, "--control-preprocess", "inpaint_only"]) == 0
    masked, = (tmp_path / "cn_inpaint").glob("*.png")
    assert "Module: inpaint" in Image.open(masked).info["parameters"]
    assert np.abs(np.asarray(Image.open(masked), np.float32) - a).max() > 5


# --- SDXL: against StableDiffusionXLControlNetPipeline, and with the refiner -------------------------


@pytest.fixture(scope="module")
def controlled_xl(tiny_xl_reference, tiny_xl_refiner_reference, tmp_path_factory):
    import sdtorch

    theirs = reference_controlnet(TINY_XL, seed=30, embed=(16, 32))
    folder = tmp_path_factory.mktemp("cn-xl") / "cn"
    theirs.save_pretrained(folder)
    ours = sdtorch.load(tiny_xl_reference.checkpoint, config=tiny_xl_reference.preset)
    refiner = sdtorch.load(tiny_xl_refiner_reference.checkpoint, config=tiny_xl_refiner_reference.preset)
    return ours, refiner, tiny_xl_reference.folder, theirs, cn_format.load(folder, TINY_XL.unet)


def test_sdxl_controlnet_txt2img_matches_diffusers(controlled_xl, parity_log):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    from sdtorch.adapters.control import ControlUnit
    from sdtorch.generate.request import GenerationRequest

    ours, _, folder, theirs_net, net = controlled_xl
    hint = _hints(1)[0]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(folder, controlnet=theirs_net, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPT, image=hint, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64,
                  width=64, num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(1234), output_type="pt",
                  controlnet_conditioning_scale=0.7, control_guidance_start=0.0, control_guidance_end=0.8).images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=6, sampler="euler", scheduler="automatic", seed=1234, width=64,
                                height=64, batch_size=2, prompt_syntax="plain",
                                controls=(ControlUnit(net, hint, weight=0.7, start=0.0, end=0.8),))
    got = torch.stack([_tensor(im) for im in ours.run(request).images])
    plain = _tensor(ours.run(replace(request, controls=())).images[0])
    mse = (got - theirs.float()).pow(2).mean().item()
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    parity_log("controlnet sdxl txt2img PSNR (8-bit images)", psnr, worst=min)
    assert psnr >= 45, psnr
    assert (got[0] - plain).abs().max() > 0.01


def test_sdxl_controlnet_guides_the_base_steps_before_the_refiner(controlled_xl):
    """A1111's refiner_switch_at with a ControlNet: the base's steps are controlled, the refiner's are
    not (the ControlNet is made for the base UNet): the same as handing the controlled base's
    latents to the refiner (diffusers' denoising_end / denoising_start) for a deterministic sampler."""
    from sdtorch.adapters.control import ControlUnit
    from sdtorch.generate.request import GenerationRequest

    ours, refiner, _, _, net = controlled_xl
    unit = ControlUnit(net, _hints(1)[0], weight=0.9)
    common = dict(steps=10, sampler="euler", scheduler="automatic", seed=5, width=64, height=64, prompt_syntax="plain")
    one = ours.run(GenerationRequest(PROMPT, NEGATIVE, refiner=refiner, refiner_switch_at=0.8, controls=(unit,), **common))
    first = ours.run(GenerationRequest(PROMPT, NEGATIVE, denoising_end=0.8, controls=(unit,), **common))
    second = refiner.run(GenerationRequest(PROMPT, NEGATIVE, init_latents=first.latents, denoising_start=0.8, **common))
    assert ((one.latents - second.latents).abs().max() / second.latents.abs().max()).item() <= 1e-5
    uncontrolled = ours.run(GenerationRequest(PROMPT, NEGATIVE, refiner=refiner, refiner_switch_at=0.8, **common))
    assert (uncontrolled.latents - one.latents).abs().max() > 1e-3
    assert 'ControlNet 0: "Module: none, Model: cn' in one.infotexts[0]


# --- training ---------------------------------------------------------------------------------------


def test_controlnet_training_starts_as_no_change_and_writes_a_loadable_file(tiny_file, tmp_path):
    from PIL import Image, ImageDraw

    import sdtorch
    from sdtorch.adapters.control import with_residuals
    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.jobs import ControlNetJob
    from sdtorch.training.train import TrainConfig, train

    pipe = sdtorch.load(tiny_file)
    job = ControlNetJob(pipe.config, pipe.vae, pipe.clip, pipe.unet)
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 600.0]), torch.randn(2, 77, 32)
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # zero convolutions: the controlled UNet is the UNet
        assert torch.equal(with_residuals(pipe.unet, job.net(x, hint, t, ctx), x, t, ctx), pipe.unet(x, t, ctx))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, 50, 50), fill=(200, 40, 40))
        im.save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "text": "a disc"}}\n' for i in range(4)))
    edges = job.hints(torch.from_numpy(np.asarray(Image.open(data / "0.png"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    assert edges.shape == (1, 3, 64, 64) and 0 < edges.mean() < 0.3  # an outline
    ema = train(job, ImageCaptionDataset(data, 64), TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=2,
                                                                warmup=1, save_every=0, log_every=1), progress=False)
    assert any(p.abs().sum() > 0 for p in ema["controlnet"].zero_convs.parameters())  # it learned something
    path = job.export(ema, tmp_path / "control_tiny.safetensors")
    loaded = cn_format.load(path, pipe.config.unet)
    assert loaded.title == "control_tiny"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema["controlnet"].state_dict().values()))


def test_inpaint_controlnet_unit_marks_the_mask_and_matches_diffusers(controlled, parity_log):
    """An inpaint ControlNet's unit: the control image with -1 under the mask (diffusers'
    make_inpaint_condition), the mask resized with the image; txt2img against
    StableDiffusionControlNetPipeline given that condition tensor."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    from sdtorch.adapters.control import ControlUnit, control_hint
    from sdtorch.generate.request import GenerationRequest, RequestError

    ours, folder, nets = controlled
    image = _hints(1)[0]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 20:52] = 1
    unit = ControlUnit(nets[0][1], image, weight=0.9, mask=mask, module="inpaint")
    condition = image.clone()
    condition[mask.expand_as(image) > 0.5] = -1.0  # as diffusers' docs make it
    assert torch.equal(control_hint(unit, 64, 64), condition)
    small = ControlUnit(nets[0][1], image[..., ::2, ::2], mask=mask[..., ::2, ::2], module="inpaint")
    assert torch.equal(control_hint(small, 64, 64) == -1, mask.expand(1, 3, -1, -1) > 0.5)  # resized together
    with pytest.raises(RequestError, match="needs a mask"):
        GenerationRequest(PROMPT, controls=(replace(unit, mask=None),)).validate()

    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=nets[0][0], safety_checker=None,
                                                             requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPT, image=condition, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5,
                  height=64, width=64, num_images_per_prompt=2, controlnet_conditioning_scale=0.9,
                  generator=torch.Generator("cpu").manual_seed(1234), output_type="pt").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=6, sampler="euler", scheduler="automatic", seed=1234,
                                width=64, height=64, batch_size=2, prompt_syntax="plain", controls=(unit,))
    got = torch.stack([_tensor(im) for im in ours.run(request).images])
    unmasked = _tensor(ours.run(replace(request, controls=(replace(unit, mask=None, module="none"),))).images[0])
    psnr = 10 * math.log10(1 / max((got - theirs.float()).pow(2).mean().item(), 1e-12))
    parity_log("inpaint controlnet txt2img PSNR (8-bit images)", psnr, worst=min)
    assert psnr >= 45, psnr
    assert (got[0] - unmasked).abs().max() > 0.01  # the mask reached the ControlNet
