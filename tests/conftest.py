"""Shared pytest fixtures and options."""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace

import pytest
from reference_models import Reference, build_reference

from sdtorch.config import SD15, SD21, TINY, TINY_XL, ModelConfig


def _reference(tmp_path_factory: pytest.TempPathFactory, preset: ModelConfig, seed: int = 0):
    """Build a preset's random-weight reference once per session; delete it afterwards
    (a full-size one takes ~8 GB of disk)."""
    root = tmp_path_factory.mktemp(f"{preset.name}_reference")
    reference = build_reference(preset, root, seed=seed)
    gc.collect()
    yield reference
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Reference:
    """TINY as a diffusers folder and an original-layout .safetensors file."""
    yield from _reference(tmp_path_factory, TINY)


# SD 2.x in miniature: OpenCLIP-layout text encoder read at the penultimate layer, linear
# transformer projections with a fixed head width, v-prediction.
TINY_V = replace(
    TINY,
    name="tiny-v",
    clip=replace(TINY.clip, layers=3, act="gelu", pad_token_id=0, clip_skip=2),
    unet=replace(TINY.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
    prediction="v",
    clip_layout="openclip",
)


@pytest.fixture(scope="session")
def tiny_v_reference(tmp_path_factory) -> Reference:
    """TINY_V as a diffusers folder and an original-layout .safetensors file."""
    yield from _reference(tmp_path_factory, TINY_V)


@pytest.fixture(scope="session")
def tiny_inpaint_reference(tmp_path_factory) -> Reference:
    """TINY with a 9-channel UNet (latents, mask, masked-image latents), like SD inpainting models."""
    yield from _reference(tmp_path_factory, replace(TINY, name="tiny-inpaint", unet=replace(TINY.unet, in_channels=9)))


@pytest.fixture(scope="session")
def sd15_reference(tmp_path_factory) -> Reference:
    """SD 1.5 architecture, random weights (slow: ~4 GB per copy)."""
    yield from _reference(tmp_path_factory, SD15)


@pytest.fixture(scope="session")
def sd15_inpaint_reference(tmp_path_factory) -> Reference:
    """SD 1.5 inpainting architecture (9-channel UNet), random weights (slow)."""
    yield from _reference(tmp_path_factory, replace(SD15, name="sd15-inpaint", unet=replace(SD15.unet, in_channels=9)))


@pytest.fixture(scope="session")
def sd21_reference(tmp_path_factory) -> Reference:
    """SD 2.1 (768, v-prediction) architecture, random weights (slow: ~4 GB per copy)."""
    yield from _reference(tmp_path_factory, SD21)


# The SDXL refiner in miniature: OpenCLIP-type text encoder only (penultimate layer, projected
# pooled output), aesthetic-score conditioning, one transformer depth for every level.
TINY_XL_REFINER = replace(
    TINY_XL, name="tiny-xl-refiner", clip=TINY_XL.clip2, clip2=None, clip_layout="sdxl-refiner",
    unet=replace(TINY_XL.unet, context_dim=32, adm_in_channels=32 + 5 * 8, transformer_depth=2),
    micro=("original_size", "crop", "aesthetic_score"),
)


@pytest.fixture(scope="session")
def tiny_xl_reference(tmp_path_factory) -> Reference:
    """TINY_XL (two text encoders, per-level transformer depth, micro-conditioning) as a diffusers
    StableDiffusionXLPipeline folder and an original-layout single file."""
    yield from _reference(tmp_path_factory, TINY_XL)


@pytest.fixture(scope="session")
def tiny_xl_refiner_reference(tmp_path_factory) -> Reference:
    """TINY_XL_REFINER as a StableDiffusionXLImg2ImgPipeline folder and a single file."""
    yield from _reference(tmp_path_factory, TINY_XL_REFINER, seed=10)


@pytest.fixture(scope="session")
def tiny_xl_inpaint_reference(tmp_path_factory) -> Reference:
    """TINY_XL with a 9-channel UNet (SDXL inpainting)."""
    cfg = replace(TINY_XL, name="tiny-xl-inpaint", unet=replace(TINY_XL.unet, in_channels=9))
    yield from _reference(tmp_path_factory, cfg, seed=20)


@pytest.fixture(scope="session")
def tiny_file(tiny_reference, tmp_path_factory):
    """The tiny reference as sdtorch writes it: one .safetensors with its config in the metadata,
    so it loads without `config=` (as a trained sdtorch model does)."""
    import sdtorch
    from sdtorch.formats import checkpoint

    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY)
    path = tmp_path_factory.mktemp("tiny_file") / "tiny.safetensors"
    return checkpoint.save(path, pipe.unet, pipe.vae, pipe.clip, TINY)


_PARITY: dict[str, float] = {}


@pytest.fixture
def parity_log(request):
    """record(quantity, value): keep the worst value of each measured parity quantity, printed
    in the terminal summary (e.g. 'sd15 unet rel_err')."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    preset = {"tiny_reference": "tiny", "tiny_v_reference": "tinyv", "sd15_reference": "sd15",
              "sd21_reference": "sd21"}.get(params.get("pair"), "")

    def record(quantity: str, value: float, worst=max) -> float:
        key = f"{preset} {quantity}".strip()
        _PARITY[key] = worst(_PARITY.get(key, value), value)
        return value

    return record


def pytest_terminal_summary(terminalreporter):
    if _PARITY:
        terminalreporter.section("parity with the reference (worst measured)")
        for key in sorted(_PARITY):
            terminalreporter.write_line(f"{key:<40} {_PARITY[key]:.3g}")
