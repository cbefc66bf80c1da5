"""ControlNet models and files: the residuals of diffusers' `ControlNetModel` on the same random
weights (SD 1 and SDXL shapes, tiny), from a diffusers folder, from the original `control_model.*`
layout (converted here and read back by diffusers' own single-file loader) and from a
diffusers-keyed single file; wrong files and wrong families refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtorch.config import TINY, TINY_XL
from sdtorch.formats import controlnet as cn_format
from sdtorch.formats.diffusers_config import diffusers_configs
from sdtorch.formats.files import CheckpointError

EMBED = (16, 32, 96, 256)  # the hint encoder's widths (the real ones: 8x down to the latents)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def reference_controlnet(preset, seed: int = 0):
    """diffusers' ControlNetModel copied from a random UNet of the preset, with its zero-initialised
    layers (hint output, zero convolutions) made random so that every residual carries signal."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**diffusers_configs(preset)["unet"])
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(preset, batch: int = 2):
    g = torch.Generator().manual_seed(7)
    side = 16  # latent side; the control image is 8x that
    x = torch.randn(batch, 4, side, side, generator=g)
    hint = torch.rand(batch, 3, side * EMBED_DOWN, side * EMBED_DOWN, generator=g)
    t = torch.tensor([500.0] * batch)
    context = torch.randn(batch, 77, preset.unet.context_dim, generator=g)
    y = torch.randn(batch, preset.unet.adm_in_channels, generator=g) if preset.unet.adm_in_channels else None
    return x, hint, t, context, y


EMBED_DOWN = 2 ** (len(EMBED) - 1)


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
