"""Low memory (`load(low_memory=True)`, `--low-memory`): a single file's parts read when a run
needs them, the text encoders freed after encoding and read again later (sdtorch.generate.offload)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sdtorch
from sdtorch.adapters import tiling
from sdtorch.formats import checkpoint
from sdtorch.formats.files import read_state_dict
from sdtorch.generate.offload import is_meta
from sdtorch.generate.params import GenerationParams
from sdtorch.generate.vae import is_tiled

UNET = "model.diffusion_model."


def _params(seed: int = 5) -> GenerationParams:
    return GenerationParams("a red house, blue sky", "blurry", steps=3, sampler="euler", cfg_scale=6.0, seed=seed,
                            width=64, height=64)


def test_lazy_read_leaves_the_chosen_tensors_unread(tiny_xl_reference):
    full, _ = read_state_dict(tiny_xl_reference.checkpoint)
    lazy, _ = read_state_dict(tiny_xl_reference.checkpoint, lambda k: k.startswith(UNET))
    assert full.keys() == lazy.keys() and any(k.startswith(UNET) for k in full)
    for k, v in lazy.items():
        assert v.is_meta == k.startswith(UNET) and (v.shape, v.dtype) == (full[k].shape, full[k].dtype)
        if not v.is_meta:
            assert torch.equal(v, full[k])


def test_low_memory_run_equals_the_normal_one_and_never_holds_unet_and_text_together(tiny_xl_reference):
    ref = tiny_xl_reference
    normal = sdtorch.load(ref.checkpoint, config=ref.preset)
    low = sdtorch.load(ref.checkpoint, config=ref.preset, low_memory=True)
    assert is_meta(low.unet) and not is_meta(low.clip) and not is_meta(low.clip2)  # the UNet waits in the file
    assert low.device == torch.device("cpu") and low.dtype == torch.float32
    seen = []
    low.unet.register_forward_pre_hook(lambda m, a: seen.append((is_meta(low.clip), is_meta(low.clip2))))
    expected = normal.generate_latents(_params(), progress=False)
    assert torch.equal(low.generate_latents(_params(), progress=False), expected)
    assert seen and set(seen) == {(True, True)}  # every UNet call ran with both text encoders freed
    assert is_meta(low.clip) and is_meta(low.clip2) and not is_meta(low.unet)
    # a second run reads the text encoders again (the UNet stays)
    assert torch.equal(low.generate_latents(_params(), progress=False), expected)
    other = normal.generate_latents(_params(seed=6), progress=False)
    assert torch.equal(low.generate_latents(_params(seed=6), progress=False), other)


def test_low_memory_folder_frees_text_encoders_and_says_it_cannot_read_them_again(tiny_xl_reference):
    ref = tiny_xl_reference
    low = sdtorch.load(ref.folder, low_memory=True)  # a folder is read whole: the UNet is there from the start
    assert low.offload is None and not is_meta(low.unet)
    low.generate_latents(_params(), progress=False)
    assert is_meta(low.clip)
    with pytest.raises(RuntimeError, match="no single file to read them from again"):
        low.generate_latents(_params(), progress=False)


def test_lazy_unet_still_guesses_the_prediction_from_its_hint(tmp_path):
    from safetensors.torch import save_file

    from sdtorch.config import SD21
    from sdtorch.families import family_of

    key = family_of(SD21).v_hint
    bias = torch.linspace(-0.5, 0.5, 8)  # std 0.3: a v-model's spread
    path = tmp_path / "hint.safetensors"
    save_file({UNET + key: bias, UNET + "other.weight": torch.ones(3)}, path)
    sd, _ = read_state_dict(path, lambda k: k.startswith(UNET))
    unet = {k[len(UNET):]: v for k, v in sd.items()}
    read = checkpoint._hint_read(unet, SD21, path)
    assert torch.equal(read[key], bias) and read["other.weight"].is_meta  # only the hint is read
    assert checkpoint.guess_prediction(read, SD21)[0] == "v"


def test_low_memory_tiles_the_vae_from_1024_squared():
    for low, at, above in ((False, False, True), (True, True, True)):
        pipe = SimpleNamespace(tile_vae=None, low_memory=low)
        assert is_tiled(pipe, None, tiling.AUTO_CELLS) == at
        assert is_tiled(pipe, None, tiling.AUTO_CELLS + 1) == above
        assert not is_tiled(pipe, None, tiling.AUTO_CELLS // 4)
        assert not is_tiled(pipe, False, tiling.AUTO_CELLS * 4) and is_tiled(pipe, True, 1)
        pipe.tile_vae = False
        assert not is_tiled(pipe, None, tiling.AUTO_CELLS * 4)
