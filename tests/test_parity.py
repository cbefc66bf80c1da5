"""Parity with the reference (diffusers / transformers) on the same random weights.

The reference models are built from their configs, written as an original-layout single file
by the tests' converter (itself checked against diffusers' own single-file loader in
test_convert.py), loaded by sdtorch, and compared component by component and for whole
text-to-image runs with every sampler. Tiny models run by default; the SD 1.5 and SD 2.1
(768-v) architectures are marked slow.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from reference_models import SCHEDULERS, reference_scheduler

import sdtorch
from sdtorch.generate.pipeline import GenerationParams

REFERENCES = [
    pytest.param("tiny_reference", id="tiny"),
    pytest.param("tiny_v_reference", id="tinyv"),
    pytest.param("sd15_reference", id="sd15", marks=pytest.mark.slow),
    pytest.param("sd21_reference", id="sd21", marks=pytest.mark.slow),
]
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "",
    "Ünïcödé café, 東京 🍎!!! (masterpiece:1.2) & co.",
    " ".join(["a very long prompt that goes on"] * 20),  # > 77 tokens: truncated as the reference
]
# Samplers are architecture-independent and every one is compared on both tiny models; the
# full-size architectures run a few that cover each family (DDIM with noise, ancestral,
# multistep with Karras sigmas, predictor-corrector) to keep the CI run short.
FULL_SIZE_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_karras", "unipc")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module", params=REFERENCES)
def pair(request):
    """(sdtorch pipeline, diffusers pipeline) on the same weights, fp32."""
    from diffusers import StableDiffusionPipeline

    ref = request.getfixturevalue(request.param)
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    theirs = StableDiffusionPipeline.from_pretrained(ref.folder, local_files_only=True, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    yield ours, theirs
    del ours, theirs
    gc.collect()


@torch.no_grad()
def test_text_encoder(pair, parity_log):
    ours, theirs = pair
    a = ours.encode_prompt(PROMPTS, syntax="plain")  # the reference's truncation, no emphasis
    b = theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert a.shape == b.shape
    assert parity_log("text encoder rel_err", rel_err(a, b)) <= 1e-4


@torch.no_grad()
def test_text_encoder_clip_skip(pair, parity_log):
    ours, theirs = pair
    # One layer earlier than the model's default, final layer norm applied (as diffusers' and
    # A1111's clip skip). diffusers' own clip_skip path predates transformers 5's CLIPTextModel,
    # so the reference is computed from the hidden states directly.
    a = ours.encode_prompt(PROMPTS, clip_skip=ours.config.clip.clip_skip + 1, syntax="plain")
    ids = theirs.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    b = theirs.text_encoder.final_layer_norm(hidden)
    assert parity_log("text encoder (clip skip) rel_err", rel_err(a, b)) <= 1e-4


@torch.no_grad()
def test_unet_step(pair, parity_log):
    ours, theirs = pair
    g = torch.Generator().manual_seed(0)
    cfg = ours.config
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([981.0, 1.0])
    a = ours.unet(x, t, ctx)
    b = theirs.unet(x, t, encoder_hidden_states=ctx).sample
    assert parity_log("unet rel_err", rel_err(a, b)) <= 1e-4


@torch.no_grad()
def test_vae_encode_decode(pair, parity_log):
    ours, theirs = pair
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    post_a, post_b = ours.vae.encode(image), theirs.vae.encode(image).latent_dist
    assert parity_log("vae encode mean rel_err", rel_err(post_a.mean, post_b.mean)) <= 1e-4
    assert parity_log("vae encode std rel_err", rel_err(post_a.std, post_b.std)) <= 1e-4
    za = post_a.sample(torch.Generator().manual_seed(3))
    zb = post_b.sample(torch.Generator().manual_seed(3))
    assert parity_log("vae sample rel_err", rel_err(za, zb)) <= 1e-4
    assert parity_log("vae decode rel_err", rel_err(ours.vae.decode(zb), theirs.vae.decode(zb).sample)) <= 1e-4


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_txt2img(pair, sampler, parity_log):
    ours, theirs = pair
    if ours.config.unet.model_channels >= 320 and sampler not in FULL_SIZE_SAMPLERS:
        pytest.skip("full-size architectures run FULL_SIZE_SAMPLERS; every sampler runs on the tiny models")
    # Full-size architectures take 4 steps (enough for every multistep order to be used) to keep
    # the CI run short; the tiny ones take 6.
    steps = 6 if ours.config.unet.model_channels < 320 else 4
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    eta = 0.5 if sampler == "ddim" else 0.0  # exercise DDIM's per-step noise too
    params = GenerationParams(
        "a red apple on a table", "blurry", steps=steps, sampler=sampler, cfg_scale=7.5, seed=1234,
        width=64, height=64, batch_size=2, eta=eta,
    )
    a = ours.generate_latents(params, progress=False)
    b = theirs(
        params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
        guidance_scale=params.cfg_scale, height=64, width=64, num_images_per_prompt=2, eta=eta,
        generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent",
    ).images
    assert parity_log("txt2img latents rel_err", rel_err(a, b)) <= 1e-3
    image_a = ours.decode(a)
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert parity_log("txt2img image PSNR dB", psnr(image_a, image_b), worst=min) >= 45.0
