"""sdtorch.formats.diffusers: exact round trips, config round trips, and diffusers' own single-file
loader as the judge of the original layout we write."""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference_models import (
    Reference,
    build_reference,
    key_lines,
    openclip_unused_shapes,
    read_key_list,
    write_original_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file

from sdtorch.config import SD15, SD21, SD21_BASE, TINY, ModelConfig
from sdtorch.formats.diffusers import (
    diffusers_folder_to_original,
    hf_to_openclip,
    openclip_to_hf,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from sdtorch.formats.diffusers_config import config_from_diffusers, diffusers_configs

DATA = Path(__file__).parent / "data"

# TINY variants that exercise the other code paths: SD2-style UNet (linear projections, fixed
# head width), three levels with two res blocks and attention on two of them, OpenCLIP text.
TINY_SD2_UNET = replace(TINY.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)
TINY_DEEP = replace(
    TINY,
    unet=replace(TINY.unet, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4, 1)),
    vae=replace(TINY.vae, ch_mult=(1, 2, 2), num_res_blocks=2),
)
TINY_OPENCLIP = replace(
    TINY,
    name="tiny-openclip",
    clip=replace(TINY.clip, act="gelu", pad_token_id=0),
    unet=TINY_SD2_UNET,
    clip_layout="openclip",
    prediction="v",
)


def _diffusers_models(preset: ModelConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfgs = diffusers_configs(preset)
    return (
        UNet2DConditionModel(**cfgs["unet"]),
        AutoencoderKL(**cfgs["vae"]),
        CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])),
    )


def _assert_same(a: dict, b: dict) -> None:
    missing, extra = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def _hf_text(model) -> dict:
    """A CLIPTextModel's state dict with the `text_model.` level (flattened in transformers >= 5.6)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Exact round trips


@pytest.mark.parametrize(
    "preset", [TINY, replace(TINY, unet=TINY_SD2_UNET), TINY_DEEP], ids=["sd1", "sd2", "deep"]
)
def test_unet_round_trip(preset):
    torch.manual_seed(0)
    unet, _, _ = _diffusers_models(preset)
    sd = unet.state_dict()
    original = unet_from_diffusers(sd, preset.unet)
    assert "input_blocks.0.0.weight" in original and "out.2.weight" in original
    _assert_same(unet_to_diffusers(original, preset.unet), sd)


def test_unet_projection_shapes():
    sd1 = unet_from_diffusers(_diffusers_models(TINY)[0].state_dict(), TINY.unet)
    sd2_preset = replace(TINY, unet=TINY_SD2_UNET)
    sd2 = unet_from_diffusers(_diffusers_models(sd2_preset)[0].state_dict(), TINY_SD2_UNET)
    key = "input_blocks.3.1.proj_in.weight"  # TINY: 1 = ResBlock, 2 = downsample, 3 = ResBlock + attention
    assert sd1[key].shape == (64, 64, 1, 1) and sd2[key].shape == (64, 64)


@pytest.mark.parametrize("preset", [TINY, TINY_DEEP], ids=["tiny", "deep"])
def test_vae_round_trip(preset):
    torch.manual_seed(0)
    _, vae, _ = _diffusers_models(preset)
    sd = vae.state_dict()
    original = vae_from_diffusers(sd, preset.vae)
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # decoder.up.0 is the last (full-resolution) diffusers up block
    n = len(preset.vae.ch_mult) - 1
    top = sd[f"decoder.up_blocks.{n}.resnets.0.conv1.weight"]
    assert torch.equal(original["decoder.up.0.block.0.conv1.weight"], top)
    _assert_same(vae_to_diffusers(original, preset.vae), sd)


def test_openclip_round_trip():
    torch.manual_seed(0)
    _, _, text = _diffusers_models(TINY_OPENCLIP)
    hf = _hf_text(text)
    w = TINY_OPENCLIP.clip.width
    proj, scale = torch.randn(w, w), torch.tensor(4.6)
    oc = hf_to_openclip(hf, text_projection=proj, logit_scale=scale)
    fused = oc["transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3 * w, w)
    assert torch.equal(fused[w : 2 * w], hf["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    assert oc["text_projection"] is proj and oc["logit_scale"] is scale
    assert "text_projection" not in hf_to_openclip(hf)
    _assert_same(openclip_to_hf(oc), hf)  # text_projection / logit_scale dropped


def test_hf_text_encoder_is_stored_as_is(tiny_reference: Reference):
    sd, _ = diffusers_folder_to_original(tiny_reference.folder)
    saved = load_file(tiny_reference.folder / "text_encoder" / "model.safetensors")
    prefix = "cond_stage_model.transformer."
    text = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    _assert_same(text, {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in saved.items()})


def test_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="input_blocks.99"):
        unet_to_diffusers({"input_blocks.99.0.in_layers.0.weight": torch.zeros(1)}, TINY.unet)


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "preset", [TINY, SD15, SD21, SD21_BASE, TINY_DEEP, TINY_OPENCLIP], ids=lambda p: p.name
)
def test_config_round_trip(preset):
    c = diffusers_configs(preset)
    got = config_from_diffusers(c["unet"], c["vae"], c["text_encoder"], c["scheduler"], name=preset.name)
    # A diffusers text encoder holds only the layers that are used: N layers = (N, clip_skip 1).
    used = preset.clip.layers - preset.clip.clip_skip + 1
    assert got == replace(preset, clip=replace(preset.clip, layers=used, clip_skip=1))


def test_diffusers_head_counts_and_layers():
    """diffusers' `attention_head_dim` is a head count (SD2: per block, 64 wide each)."""
    assert diffusers_configs(SD21)["text_encoder"]["num_hidden_layers"] == 23
    assert diffusers_configs(SD21)["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert diffusers_configs(SD15)["unet"]["attention_head_dim"] == 8
    for preset, heads in [(SD15, (8, 8)), (SD21, (5, 20))]:
        with torch.device("meta"):
            unet, _, _ = _diffusers_models(preset)
        first = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        mid = unet.mid_block.attentions[0].transformer_blocks[0].attn2
        assert (first.heads, mid.heads) == heads


# Abridged from the published config.json files of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1: the fields sdtorch reads. Their text encoders say pad_token_id 1;
# the pad token that matters is the tokenizer's.
_SD15_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SD21_UNET = _SD15_UNET | {
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}
_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_SD15_TEXT = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "vocab_size": 49408,
}
_SD21_TEXT = _SD15_TEXT | {
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
}
_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def test_config_from_published_configs():
    pad = "<|endoftext|>"
    assert config_from_diffusers(_SD15_UNET, _VAE, _SD15_TEXT, _SCHEDULER, pad_token=pad, name="sd15") == SD15
    vae, scheduler = _VAE | {"sample_size": 768}, _SCHEDULER | {"prediction_type": "v_prediction"}
    sd21 = config_from_diffusers(_SD21_UNET, vae, _SD21_TEXT, scheduler, pad_token="!", name="sd21")
    assert sd21 == replace(SD21, clip=replace(SD21.clip, layers=23, clip_skip=1))


def test_config_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        config_from_diffusers(_SD15_UNET, _VAE, _SD15_TEXT, _SCHEDULER | {"prediction_type": "sample"})
    with pytest.raises(ValueError, match="head width"):
        config_from_diffusers(_SD15_UNET | {"attention_head_dim": [5, 5, 5, 5]}, _VAE, _SD15_TEXT, _SCHEDULER)


# ---------------------------------------------------------------------------------------------
# Diffusers folders and diffusers' own single-file loader


def _assert_single_file_matches_folder(folder: Path, checkpoint: Path) -> None:
    """Load `checkpoint` with diffusers' `from_single_file` (configs from `folder`) and require
    every unet/vae/text_encoder tensor to equal the folder's, one component at a time."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(folder), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder"):
        (weights,) = (folder / name).glob("*.safetensors")
        _assert_same(getattr(pipe, name).state_dict(), load_file(weights))
        setattr(pipe, name, None)
        gc.collect()
    del pipe
    gc.collect()


def test_reference_folder_loads_with_diffusers(tiny_reference: Reference):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_reference.folder, local_files_only=True)
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.safety_checker is None


def test_folder_to_original_config(tiny_reference: Reference):
    _, cfg = diffusers_folder_to_original(tiny_reference.folder)
    assert cfg == replace(TINY, name=tiny_reference.folder.name)


def test_tiny_single_file_loads_in_diffusers(tiny_reference: Reference):
    _assert_single_file_matches_folder(tiny_reference.folder, tiny_reference.checkpoint)


def test_tiny_openclip_single_file_loads_in_diffusers(tmp_path):
    ref = build_reference(TINY_OPENCLIP, tmp_path)
    with safe_open(ref.checkpoint, "pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in keys  # the unused extra layer
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= keys
    _assert_single_file_matches_folder(ref.folder, ref.checkpoint)
    _, cfg = diffusers_folder_to_original(ref.folder)
    assert cfg.clip_layout == "openclip" and cfg.prediction == "v" and cfg.clip.pad_token_id == 0


def test_ckpt_file_holds_the_same_state_dict(tiny_reference: Reference, tmp_path):
    path = write_original_checkpoint(tiny_reference.folder, tmp_path / "tiny.ckpt", dtype=torch.float16)
    ckpt = torch.load(path, weights_only=True)["state_dict"]
    reference = load_file(tiny_reference.checkpoint)
    _assert_same(ckpt, {k: v.half() for k, v in reference.items()})


def test_bin_folder_converts(tiny_reference: Reference, tmp_path):
    folder = shutil.copytree(tiny_reference.folder, tmp_path / "bin")
    for name in ("unet", "vae", "text_encoder"):
        file = "pytorch_model" if name == "text_encoder" else "diffusion_pytorch_model"
        (weights,) = (folder / name).glob("*.safetensors")
        torch.save(load_file(weights), folder / name / f"{file}.bin")
        weights.unlink()
    got, _ = diffusers_folder_to_original(folder)
    expected, _ = diffusers_folder_to_original(tiny_reference.folder)
    _assert_same(got, expected)


def test_missing_parts_raise(tiny_reference: Reference, tmp_path):
    folder = shutil.copytree(tiny_reference.folder, tmp_path / "broken")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vae"):
        diffusers_folder_to_original(folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(FileNotFoundError, match="unet"):
        diffusers_folder_to_original(folder)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        diffusers_folder_to_original(tmp_path)


# ---------------------------------------------------------------------------------------------
# The key contract: tests/data/keys_*.txt


def _meta_original_shapes(preset: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full original file for a preset, converted from diffusers models built
    on the meta device (no memory): what write_original_checkpoint writes."""
    with torch.device("meta"):
        unet, vae, text = _diffusers_models(preset)
    unet_sd = unet_from_diffusers(unet.state_dict(), preset.unet)
    vae_sd = vae_from_diffusers(vae.state_dict(), preset.vae)
    shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet_sd.items()}
    shapes |= {f"first_stage_model.{k}": tuple(v.shape) for k, v in vae_sd.items()}
    if preset.clip_layout == "openclip":
        oc = {k: tuple(v.shape) for k, v in hf_to_openclip(_hf_text(text)).items()}
        oc |= openclip_unused_shapes(preset.clip, text.config.num_hidden_layers)
        return shapes | {f"cond_stage_model.model.{k}": s for k, s in oc.items()}
    return shapes | {f"cond_stage_model.transformer.{k}": tuple(v.shape) for k, v in _hf_text(text).items()}


@pytest.mark.parametrize("preset", [SD15, SD21], ids=lambda p: p.name)
def test_key_list_matches_conversion(preset):
    assert key_lines(_meta_original_shapes(preset)) == read_key_list(DATA / f"keys_{preset.name}.txt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_single_file_loads_in_diffusers(name, request):
    """Full-size SD 1.5 / SD 2.1 architectures: diffusers reads our original file back exactly,
    and the file's keys and shapes are the key contract."""
    ref: Reference = request.getfixturevalue(f"{name}_reference")
    with safe_open(ref.checkpoint, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert key_lines(shapes) == read_key_list(DATA / f"keys_{name}.txt")
    _assert_single_file_matches_folder(ref.folder, ref.checkpoint)
