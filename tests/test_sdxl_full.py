"""The real SDXL base and refiner architectures (random weights stored in float16, as the released
files are) against diffusers, at a small size and few steps. One model at a time (the base's UNet
alone is 10 GB in float32): the tests' converter writes the single file from the diffusers folder,
diffusers' own single-file loader reads it back to the folder's weights, diffusers runs the folder
in float32, then sdtorch runs the single file (detected from its keys alone) in float32."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import shutil
from pathlib import Path

import pytest
import torch
from reference_models import build_reference
from safetensors import safe_open
from test_sdxl import NEGATIVE, PROMPT, psnr, rel_err

import sdtorch
from sdtorch.config import SDXL, SDXL_REFINER
from sdtorch.generate.pipeline import GenerationParams

pytestmark = pytest.mark.slow
SIZE, SEED = 64, 21


def _free() -> None:
    """Collect what the caller deleted and hand the memory back to the system (glibc keeps freed
    arenas otherwise, and the stages' peaks would add up)."""
    gc.collect()
    if ctypes.util.find_library("c"):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _reference_pipeline(cls, folder: Path):
    """The folder in float32, read as stored (float16) and cast in place, which peaks lower than
    from_pretrained casting while loading."""
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _file_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _assert_single_file_matches_folder(cls, ref, parts: tuple[str, ...], bigg: str) -> None:
    """diffusers' from_single_file reads the tests' single file back to the folder's tensors
    (OpenCLIP bigG through diffusers' converter: see test_sdxl.test_single_file_through_diffusers_loader)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe = cls.from_single_file(str(ref.checkpoint), config=str(ref.folder), local_files_only=True,
                                torch_dtype=torch.float16)
    for part in parts:
        (weights,) = (ref.folder / part).glob("*.safetensors")
        expected, got = _file_tensors(weights), getattr(pipe, part).state_dict()
        keys = [k for k in expected if not k.endswith("position_ids")]
        assert len(keys) > 100 and all(torch.equal(got[k], expected[k]) for k in keys), part
        setattr(pipe, part, None)
        del expected, got
        _free()
    text_encoder_2 = pipe.text_encoder_2
    (weights,) = (ref.folder / "text_encoder_2").glob("*.safetensors")
    expected = _file_tensors(weights)
    converted = convert_open_clip_checkpoint(text_encoder_2, _file_tensors(ref.checkpoint, bigg), prefix="")
    keys = [k for k in expected if not k.endswith("position_ids")]
    assert "text_projection.weight" in keys and all(torch.equal(converted[k], expected[k]) for k in keys)
    del pipe, text_encoder_2, expected, converted
    _free()


def _ours(ref, preset):
    ours = sdtorch.load(ref.checkpoint)  # no config: detected from the keys and shapes
    assert ours.config.unet == preset.unet and ours.config.clip == preset.clip and ours.config.clip2 == preset.clip2
    assert ours.unet.input_blocks[0][0].weight.dtype == torch.float32
    return ours


@pytest.fixture
def root(tmp_path):
    """A folder for one full-size reference (~14 GB of float16 files), deleted afterwards."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@torch.no_grad()
def test_sdxl_base(root, parity_log):
    from diffusers import StableDiffusionXLPipeline

    ref = build_reference(SDXL, root, seed=3, dtype=torch.float16)
    _free()
    _assert_single_file_matches_folder(StableDiffusionXLPipeline, ref, ("unet", "vae", "text_encoder"),
                                       "conditioner.embedders.1.model.")
    theirs = _reference_pipeline(StableDiffusionXLPipeline, ref.folder)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    del theirs
    _free()
    ours = _ours(ref, SDXL)
    params = GenerationParams(PROMPT, NEGATIVE, steps=3, sampler="euler", cfg_scale=7.5, seed=SEED, width=SIZE,
                              height=SIZE)
    a = ours.generate_latents(params, progress=False)
    assert parity_log("sdxl full-size txt2img latents rel_err", rel_err(a, b)) <= 1e-4
    assert parity_log("sdxl full-size image PSNR dB", psnr(ours.decode(a), image_b), worst=min) >= 45.0


@torch.no_grad()
def test_sdxl_refiner(root, parity_log):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref = build_reference(SDXL_REFINER, root, seed=4, dtype=torch.float16)
    _free()
    _assert_single_file_matches_folder(StableDiffusionXLImg2ImgPipeline, ref, ("unet", "vae"),
                                       "conditioner.embedders.0.model.")
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    theirs = _reference_pipeline(StableDiffusionXLImg2ImgPipeline, ref.folder)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, image=(image + 1) / 2, strength=0.5, num_inference_steps=4,
               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    del theirs
    _free()
    ours = _ours(ref, SDXL_REFINER)
    params = GenerationParams(PROMPT, NEGATIVE, steps=4, sampler="euler", cfg_scale=7.5, seed=SEED, width=SIZE,
                              height=SIZE)
    a = ours.img2img_latents(image, params, 0.5, progress=False)
    assert parity_log("sdxl refiner full-size img2img latents rel_err", rel_err(a, b)) <= 1e-4
    assert parity_log("sdxl refiner full-size image PSNR dB", psnr(ours.decode(a), image_b), worst=min) >= 45.0
