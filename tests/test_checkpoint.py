"""Reading checkpoints: formats, dtypes, safety, detection, strictness."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdtorch
from sdtorch.config import SD15, SD21, SD21_BASE, TINY
from sdtorch.formats import checkpoint
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL


def _meta_state(preset):
    with torch.device("meta"):
        parts = UNetModel(preset.unet), AutoencoderKL(preset.vae), ClipTextModel(preset.clip)
    return parts


@pytest.mark.parametrize("preset", [SD15, SD21, SD21_BASE], ids=lambda p: p.name)
def test_detect_architecture_from_keys_and_shapes(preset):
    unet, vae, clip = _meta_state(preset)
    assert checkpoint.detect_unet(unet.state_dict()) == preset.unet
    assert checkpoint.detect_vae(vae.state_dict()) == replace(preset.vae)
    assert checkpoint.detect_clip(clip.state_dict(), preset.clip_layout) == preset.clip


def test_split_routes_prefixes_and_skips_only_documented_keys():
    unet, vae, clip = _meta_state(SD21)
    sd = checkpoint.original_state_dict(unet, vae, clip, SD21)
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    sd["alphas_cumprod"] = torch.zeros(1000)
    sd["model_ema.decay"] = torch.tensor(0.999)
    u, v, c, family = checkpoint.split(sd)
    assert family.layout == "openclip"
    assert set(c[0]) == set(clip.state_dict()) and set(u) == set(unet.state_dict())
    sd["something.else"] = torch.zeros(1)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected keys.*something.else"):
        checkpoint.split(sd)


def test_guess_prediction_like_comfyui():
    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    wide = {key: torch.linspace(-1, 1, 320)}
    narrow = {key: torch.zeros(320)}
    assert checkpoint.guess_prediction(wide, SD21)[0] == "v"
    assert checkpoint.guess_prediction(narrow, SD21)[0] == "eps"
    assert checkpoint.guess_prediction(wide, SD15) == ("eps", "guessed: eps (SD 1.x)")


def test_single_file_ckpt_fp16_and_folder_load_the_same_weights(tiny_reference, tmp_path):
    sd = load_file(tiny_reference.checkpoint)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    half = tmp_path / "tiny-fp16.safetensors"
    save_file({k: v.half() for k, v in sd.items()}, half)
    brain = tmp_path / "tiny-bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in sd.items()}, brain)
    a = sdtorch.load(tiny_reference.checkpoint, config=TINY)
    b = sdtorch.load(ckpt, config=TINY)
    c = sdtorch.load(tiny_reference.folder)  # diffusers folder: config from its json files
    d = sdtorch.load(half, config=TINY)
    e = sdtorch.load(brain, config=TINY)
    assert c.config.unet == TINY.unet and c.config.vae == TINY.vae
    for name in ("unet", "vae", "clip"):
        sa, sb, sc, sdd, se = (getattr(p, name).state_dict() for p in (a, b, c, d, e))
        for k in sa:
            assert torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]), k
            assert sdd[k].dtype == torch.float32 and torch.equal(sa[k].half().float(), sdd[k]), k
            assert se[k].dtype == torch.float32 and torch.equal(sa[k].bfloat16().float(), se[k]), k


def test_load_as_bf16(tiny_reference):
    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY, dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())


def test_saved_file_carries_its_config(tiny_reference, tmp_path):
    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY)
    path = checkpoint.save(tmp_path / "mine.safetensors", pipe.unet, pipe.vae, pipe.clip, TINY)
    again = sdtorch.load(path)
    assert again.config == TINY and again.prediction_source == "metadata"
    assert not list(tmp_path.glob("*.tmp"))


def test_given_prediction_and_marker_key(tiny_reference, tmp_path):
    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY, prediction="v")
    assert pipe.config.prediction == "v" and pipe.prediction_source == "given"
    sd = load_file(tiny_reference.checkpoint)
    sd["v_pred"] = torch.tensor([])
    path = tmp_path / "vpred.safetensors"
    save_file(sd, path)
    ckpt = checkpoint.read(path, config=TINY)
    assert ckpt.config.prediction == "v" and ckpt.prediction_source == "marker key"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('SDTORCH_EVIL_MARK', '/tmp/sdtorch-evil')}",))


def test_pickle_that_runs_code_is_refused_not_executed(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("SDTORCH_EVIL_MARK", str(mark))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.read_state_dict(path)
    assert not mark.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_and_missing_files(tmp_path, tiny_reference, suffix):
    path = tmp_path / f"broken{suffix}"
    src = tiny_reference.checkpoint.read_bytes()
    path.write_bytes(src[: len(src) // 2] if suffix == ".safetensors" else b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.read_state_dict(path)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.read_state_dict(tmp_path / f"missing{suffix}")
    with pytest.raises(checkpoint.CheckpointError, match="unknown checkpoint type"):
        (tmp_path / "x.txt").write_text("hi")
        checkpoint.read_state_dict(tmp_path / "x.txt")


def test_wrong_shaped_checkpoint_is_named(tiny_reference):
    bigger = replace(TINY, unet=replace(TINY.unet, model_channels=64))
    with pytest.raises(checkpoint.CheckpointError, match=r"UNet.*wrong shape.*input_blocks\.0\.0\.weight"):
        sdtorch.load(tiny_reference.checkpoint, config=bigger)


def test_not_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.foo": torch.zeros(1), "first_stage_model.bar": torch.zeros(1),
               "cond_stage_model.transformer.baz": torch.zeros(1)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a Stable Diffusion checkpoint"):
        sdtorch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15_reference", "sd21_reference"])
def test_real_layout_is_detected_without_help(name, request, capsys):
    """A full-size original-layout file read with no config: the architecture comes from the keys."""
    from sdtorch.cli import main

    ref = request.getfixturevalue(name)
    ckpt = checkpoint.read(ref.checkpoint)
    expected = ref.preset
    assert ckpt.config.unet == expected.unet and ckpt.config.vae == expected.vae
    assert ckpt.config.clip == expected.clip and ckpt.config.clip_layout == expected.clip_layout
    # Random weights carry no v-model signature, so the guess is eps, and it says it guessed.
    assert ckpt.config.prediction == "eps" and ckpt.prediction_source.startswith("guessed: eps")
    assert main(["info", str(ref.checkpoint)]) == 0
    out = capsys.readouterr().out
    assert ("SD 2.x" if expected.clip_layout == "openclip" else "SD 1.x") in out
    assert "prediction: eps (guessed" in out
    assert main(["info", str(ref.checkpoint), "--prediction", "v"]) == 0
    assert "prediction: v (given)" in capsys.readouterr().out


def test_safetensors_reader_matches_the_library_and_refuses_damage(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g), "b.f16": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "d.i64": torch.arange(4), "e.empty": torch.zeros(0, 3),
        "f.scalar": torch.tensor(2.5), "g.bool": torch.tensor([True, False]), "h.u8": torch.arange(9, dtype=torch.uint8),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    sd, meta = checkpoint.read_state_dict(path)
    assert meta == {"k": "v"} and sd.keys() == tensors.keys()
    for k, v in tensors.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and torch.equal(sd[k], v), k
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode()
    damaged = {
        "short": raw[:5],
        "length": (len(raw) * 2).to_bytes(8, "little") + raw[8:],
        "json": raw[:8] + b"{" * n + raw[8 + n :],
        "offsets": raw[:8] + header.replace('"F32"', '"F16"').encode() + raw[8 + n :],  # sizes no longer fit
        "dtype": raw[:8] + header.replace('"U8"', '"Q4"').encode() + raw[8 + n :],
        "end": raw[:-4],
    }
    for why, data in damaged.items():
        (tmp_path / f"{why}.safetensors").write_bytes(data)
        with pytest.raises(checkpoint.CheckpointError, match="cannot read .*corrupt or not a safetensors file"):
            checkpoint.read_state_dict(tmp_path / f"{why}.safetensors")
