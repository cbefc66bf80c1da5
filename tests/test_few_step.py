"""Few-step sampling settings: per-request timestep spacing (turbo models' "trailing"), against
diffusers' pipeline with the turbo models' scheduler configs on the same random weights, and the
`--preset` command-line defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from reference_models import reference_scheduler
from test_parity import psnr, rel_err

import sdtorch
from sdtorch.generate.presets import PRESETS
from sdtorch.generate.request import GenerationRequest, RequestError


@pytest.fixture(scope="module")
def pair(tiny_reference):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(tiny_reference.folder, safety_checker=None,
                                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return sdtorch.load(tiny_reference.checkpoint, config=tiny_reference.preset), theirs


@pytest.mark.parametrize("preset", ["sd-turbo", "sdxl-turbo"])
@pytest.mark.parametrize("steps", [1, 2, 4])
@torch.no_grad()
def test_turbo_settings_match_diffusers(pair, preset, steps):
    ours, theirs = pair
    p = PRESETS[preset]
    theirs.scheduler = reference_scheduler(p.sampler, dict(theirs.scheduler.config, timestep_spacing="trailing"))
    request = GenerationRequest("a red apple", steps=steps, sampler=p.sampler, scheduler="automatic",
                                cfg_scale=p.cfg, seed=7, width=64, height=64, batch_size=2,
                                timestep_spacing=p.timestep_spacing)
    result = ours.run(request)
    b = theirs("a red apple", num_inference_steps=steps, guidance_scale=p.cfg, height=64, width=64,
               num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    assert rel_err(result.latents, b) <= 1e-4
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert psnr(ours.decode(result.latents), image_b) >= 45
    assert "Timestep spacing: trailing" in result.infotexts[0]
    leading = ours.run(GenerationRequest("a red apple", steps=steps, sampler=p.sampler, scheduler="automatic",
                                         cfg_scale=p.cfg, seed=7, width=64, height=64, batch_size=2))
    assert rel_err(leading.latents, result.latents) > 1e-3  # the spacing changed the run
    assert ours.config.schedule.timestep_spacing == "leading"  # and not the loaded model


def test_bad_spacing_refused(pair):
    with pytest.raises(RequestError, match="timestep spacing"):
        pair[0].run(GenerationRequest("x", steps=2, timestep_spacing="even"))


def run_cli(tmp_path, *args):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "sdtorch.cli", "generate", "red apple", "--seed", "3", "--out", str(out),
                    *args], check=True, capture_output=True)
    (png,) = out.glob("*.png")
    return Image.open(png).info["parameters"]


def test_cli_preset_and_explicit_options(tmp_path):
    text = run_cli(tmp_path / "a", "--preset", "sd-turbo")
    for field in ["Steps: 1,", "Sampler: Euler,", "CFG scale: 0.0", "Timestep spacing: trailing"]:
        assert field in text
    text = run_cli(tmp_path / "b", "--preset", "lcm", "--steps", "6")
    assert "Steps: 6," in text and "Sampler: LCM" in text and "CFG scale: 1.0" in text
