"""img2img, inpainting and outpainting: parity with diffusers' pipelines, and their invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from reference_models import reference_scheduler

import sdtorch
import sdtorch.formats.checkpoint
from sdtorch.config import TINY
from sdtorch.editing import inspect, p2p  # noqa: F401
from sdtorch.generate.images import extend_canvas, image_tensor, img2img_start, mask_tensor
from sdtorch.generate.pipeline import GenerationParams


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def picture(size: int = 64) -> Image.Image:
    """A deterministic test picture: a gradient with a few shapes."""
    x = np.linspace(0, 255, size, dtype=np.float32)
    arr = np.stack([np.add.outer(x, x) / 2, np.tile(x, (size, 1)), np.tile(x[:, None], (1, size))], -1)
    im = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 10, 40, 40), fill=(220, 30, 30))
    draw.rectangle((36, 30, 58, 56), fill=(30, 60, 220))
    return im


def square_mask(size: int = 64) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((16, 16, 47, 47), fill=255)
    return m


def params(sampler: str, steps: int = 6, **kw) -> GenerationParams:
    return GenerationParams("a red apple", "blurry", steps=steps, sampler=sampler, cfg_scale=6.0, seed=7,
                            width=64, height=64, batch_size=2, **kw)


@pytest.fixture(scope="module")
def img2img_pair(tiny_reference):
    from diffusers import StableDiffusionImg2ImgPipeline

    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_reference.folder, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    return sdtorch.load(tiny_reference.checkpoint, config=TINY), theirs


# Not LMS: diffusers' LMSDiscreteScheduler started part-way (img2img) takes its order from the
# step index, so its first step weights a single stored derivative with a 4th-order coefficient;
# sdtorch's LMS starts at order 1 wherever it starts.
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m", "heun", "dpmpp_2m_karras"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@torch.no_grad()
def test_img2img_matches_diffusers(img2img_pair, sampler, strength, parity_log):
    ours, theirs = img2img_pair
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    p = params(sampler)
    a = ours.img2img_latents(image_tensor(picture()), p, strength)
    b = theirs(p.prompt, image=picture(), strength=strength, negative_prompt=p.negative_prompt,
               num_inference_steps=p.steps, guidance_scale=p.cfg_scale, num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").images
    assert parity_log("tiny img2img latents rel_err", rel_err(a, b)) <= 1e-3


@pytest.fixture(scope="module")
def inpaint_pair(tiny_inpaint_reference):
    from diffusers import StableDiffusionInpaintPipeline

    ref = tiny_inpaint_reference
    theirs = StableDiffusionInpaintPipeline.from_pretrained(ref.folder, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert sdtorch.formats.checkpoint.read(ref.checkpoint).config.unet.in_channels == 9  # detected from the keys
    return sdtorch.load(ref.checkpoint, config=ref.preset), theirs


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m_karras", "euler_a"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@torch.no_grad()
def test_nine_channel_inpainting_matches_diffusers(inpaint_pair, sampler, strength, parity_log):
    ours, theirs = inpaint_pair
    assert ours.config.unet.in_channels == 9
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    p = params(sampler)
    a = ours.inpaint_latents(image_tensor(picture()), mask_tensor(square_mask(), 64, 64), p, strength)
    b = theirs(p.prompt, image=picture(), mask_image=square_mask(), strength=strength, height=64, width=64,
               negative_prompt=p.negative_prompt, num_inference_steps=p.steps, guidance_scale=p.cfg_scale,
               num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(p.seed),
               output_type="latent").images
    assert parity_log("tiny-inpaint 9-channel inpaint latents rel_err", rel_err(a, b)) <= 1e-3


@pytest.fixture(scope="module")
def tiny(tiny_file):
    return sdtorch.load(tiny_file)


def test_strength_zero_is_the_vae_round_trip(tiny):
    p = params("euler")
    pixels = image_tensor(picture())
    out = tiny.img2img_latents(pixels, p, 0.0)
    expected = tiny.encode_image(pixels, torch.Generator().manual_seed(p.seed), 2)
    assert torch.equal(out, expected)
    images = tiny.img2img(picture(), "x", strength=0.0, seed=p.seed, steps=6)
    assert images[0].size == (64, 64) and "Denoising strength: 0.0" in images[0].info["parameters"]
    assert img2img_start(6, 0.0) == 6 and img2img_start(6, 1.0) == 0 and img2img_start(6, 0.75) == 2


def test_inpainting_keeps_the_known_region(tiny):
    p = params("euler_a")
    pixels, mask = image_tensor(picture()), mask_tensor(square_mask(), 64, 64)
    out = tiny.inpaint_latents(pixels, mask, p)
    known = tiny.encode_image(pixels, torch.Generator().manual_seed(p.seed), 2)
    keep = torch.nn.functional.interpolate(mask, size=out.shape[-2:]) == 0
    assert torch.equal(out.masked_select(keep.expand_as(out)), known.masked_select(keep.expand_as(known)))
    assert not torch.allclose(out, known)  # ... and repaints the rest


def test_outpainting_extends_the_canvas(tiny):
    canvas, mask = extend_canvas(picture(), left=16, right=0, top=0, bottom=16)
    assert canvas.size == (80, 80) and mask.getpixel((0, 0)) == 255 and mask.getpixel((40, 40)) == 0
    assert canvas.getpixel((0, 20)) == picture().getpixel((0, 20))  # edge pixels stretched outwards
    images = tiny.outpaint(picture(), "x", left=16, bottom=16, steps=2, seed=0, progress=False)
    assert images[0].size == (80, 80)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="strength must be in"):
        tiny.img2img(picture(), "x", strength=1.5)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        tiny.inpaint(picture(), torch.zeros(1, 1, 32, 32), "x")
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny.outpaint(picture(), "x", left=3)
    with pytest.raises(FileNotFoundError, match="image not found"):
        tiny.img2img("/nonexistent.png", "x")
    with pytest.raises(TypeError, match="unknown option"):
        tiny.img2img(picture(), "x", strenght=0.5)


def test_attention_maps_sum_to_one_over_all_tokens(tiny):
    from sdtorch.editing.p2p import AttentionStore, hooked

    store = AttentionStore(batch=2)
    with hooked(tiny.unet, store) as layers:
        tiny.generate("a red apple", steps=3, seed=0, width=64, height=64, batch_size=2, progress=False)
    assert layers and all(m.hook is None for m in layers)  # removed afterwards
    maps = store.maps((32, 32))  # tiny: latents 32x32, attention at 16x16
    assert maps.shape == (2, 77, 16, 16)
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    images, token_maps, labels = inspect.attention(tiny, "a red apple", steps=3, seed=0, width=64, height=64, progress=False)
    assert labels == ["a", "red", "apple"] and token_maps.shape == (1, 3, 16, 16)
    assert (token_maps.sum(dim=1) <= 1 + 1e-5).all()


def test_hooks_do_not_change_the_image_much_and_process_frames(tiny, tmp_path):
    from sdtorch.editing.pictures import attention_grid, save_process

    plain = tiny.generate("a red apple", steps=3, seed=0, width=64, height=64, progress=False)[0]
    images, maps, labels = inspect.attention(tiny, "a red apple", steps=3, seed=0, width=64, height=64, progress=False)
    diff = np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(images[0], dtype=np.int16)).max()
    assert diff <= 2  # explicit softmax vs fused attention: rounding only
    grid = attention_grid(images[0], maps[0], labels)
    assert grid.size == (64 * 4, 64 + 14)
    images, frames, sigmas = inspect.process(tiny, "a red apple", steps=4, seed=0, width=64, height=64, progress=False)
    assert len(frames) == 4 and sigmas == sorted(sigmas, reverse=True)
    assert np.asarray(frames[-1]).tolist() != np.asarray(frames[0]).tolist()
    assert save_process(frames, sigmas, tmp_path / "p.gif").stat().st_size > 0
    assert save_process(frames, sigmas, tmp_path / "p.png").exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_identity_edit_is_plain_generation_bit_for_bit(tiny, sampler):
    opts = dict(steps=5, sampler=sampler, seed=3, width=64, height=64, progress=False)
    plain = tiny.generate("a red apple", **opts)[0]
    for mode in ("replace", "refine"):
        source, edited = p2p.edit(tiny, "a red apple", "a red apple", mode=mode, cross_steps=1.0, self_steps=1.0, **opts)
        assert source.tobytes() == plain.tobytes(), mode
        assert edited.tobytes() == plain.tobytes(), mode


def test_word_swap_changes_the_edit_but_keeps_the_source(tiny):
    opts = dict(steps=5, seed=3, width=64, height=64, progress=False)
    plain = tiny.generate("a red apple", sampler="ddim", **opts)[0]
    source, edited = p2p.edit(tiny, "a red apple", "a green apple", **opts)
    other = tiny.generate("a green apple", sampler="ddim", **opts)[0]
    assert source.tobytes() == plain.tobytes()
    a, b, c = (np.asarray(im, dtype=np.float32) for im in (plain, edited, other))
    assert np.abs(a - b).mean() > 0  # the edit changed something ...
    assert np.abs(a - b).mean() < np.abs(a - c).mean()  # ... and kept closer to the source than a fresh prompt
    source, reweighted = p2p.edit(tiny, "a red apple", "a red apple", mode="reweight", weights={"red": 3.0}, **opts)
    assert reweighted.tobytes() != plain.tobytes()


def test_local_blend_keeps_the_rest_exactly(tiny):
    steps = []
    region = torch.zeros(1, 1, 64, 64)
    region[..., :, 32:] = 1  # the right half may change
    p2p.edit(tiny, "a red apple", "a green apple", blend=region, steps=4, seed=3, width=64, height=64,
              progress=False, cross_steps=0.5, callback=lambda d: steps.append(d["x"].clone()))
    assert len(steps) == 4
    for x in steps:
        assert torch.equal(x[0, :, :, :16], x[1, :, :, :16])  # left half of the 32x32 latents: identical
    assert not torch.equal(steps[-1][0, :, :, 16:], steps[-1][1, :, :, 16:])  # right half: edited
    images = p2p.edit(tiny, "a red apple", "a green apple", blend=["apple"], steps=2, seed=3, width=64, height=64,
                       progress=False)  # words: the mask comes from the source's attention to them
    assert len(images) == 2


def test_edit_errors(tiny):
    with pytest.raises(ValueError, match="same token count"):
        p2p.edit(tiny, "a red apple", "a very red apple", steps=2)
    with pytest.raises(ValueError, match="not a word of the edited prompt"):
        p2p.edit(tiny, "a red apple", "a red apple", mode="reweight", weights={"blue": 2.0}, steps=2)
    with pytest.raises(ValueError, match="deterministic one-call-per-step sampler"):
        p2p.edit(tiny, "a red apple", "a green apple", sampler="euler_a", steps=2)
    with pytest.raises(ValueError, match="unknown edit mode"):
        p2p.edit(tiny, "a", "b", mode="swap", steps=2)


@pytest.mark.slow
@torch.no_grad()
def test_sd15_img2img_and_inpainting_match_diffusers(sd15_reference, sd15_inpaint_reference, parity_log):
    """The SD 1.5 architecture (random weights): img2img and 9-channel inpainting, a few cases each.
    One pair of pipelines is held at a time (each pair is ~8 GB in fp32)."""
    import gc

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cases = [("euler_a", 0.6), ("dpmpp_2m_karras", 0.75), ("ddim", 0.5)]
    for ref, cls in ((sd15_reference, StableDiffusionImg2ImgPipeline), (sd15_inpaint_reference, StableDiffusionInpaintPipeline)):
        ours = sdtorch.load(ref.checkpoint)  # full-size: detected from the keys
        assert ours.config.unet == ref.preset.unet
        theirs = cls.from_pretrained(ref.folder, local_files_only=True, safety_checker=None)
        theirs.set_progress_bar_config(disable=True)
        inpaint = cls is StableDiffusionInpaintPipeline
        for sampler, strength in cases:
            theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
            p = params(sampler, steps=4)
            # the inpainting pipeline defaults to unet.sample_size * 8 pixels: give it the size
            extra = {"mask_image": square_mask(), "height": 64, "width": 64} if inpaint else {}
            if inpaint:
                a = ours.inpaint_latents(image_tensor(picture()), mask_tensor(square_mask(), 64, 64), p, strength)
            else:
                a = ours.img2img_latents(image_tensor(picture()), p, strength)
            b = theirs(p.prompt, image=picture(), strength=strength, negative_prompt=p.negative_prompt,
                       num_inference_steps=p.steps, guidance_scale=p.cfg_scale, num_images_per_prompt=2,
                       generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent", **extra).images
            name = "sd15 9-channel inpaint" if inpaint else "sd15 img2img"
            assert parity_log(f"{name} latents rel_err", rel_err(a, b)) <= 1e-3, (sampler, strength)
        del ours, theirs
        gc.collect()
