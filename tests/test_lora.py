"""LoRA files (kohya / A1111 / ComfyUI / Civitai and diffusers / PEFT formats), applying,
merging, saving and training.

Parity: LoRA files with random weights, written by the tests as kohya's sd-scripts and diffusers
name their keys, are loaded by diffusers (`StableDiffusionPipeline.load_lora_weights`, PEFT
backend) and by sdtorch into the same random-weight tiny models; UNet and text-encoder outputs
are compared dynamically (LoRA layers beside the base layers) and fused into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdtorch
from sdtorch.adapters import lora, lora_prompt, lora_train
from sdtorch.config import TINY

# Layers the random LoRAs adapt (diffusers names): attention, feed-forward, a 1x1 conv (SD1) or
# Linear (SD2) projection, 3x3 ResBlock / resampler convs (LoCon), a 1x1 skip conv and a time
# embedding Linear; in the text encoder attention and MLP.
UNET_LAYERS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2",
               "proj_in", "proj_out", "resnets.0.conv1", "conv_shortcut", "time_emb_proj",
               "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
PROMPTS = ["a photo of an astronaut riding a horse", "", "a red circle"]
REFERENCES = [pytest.param("tiny_reference", id="tiny"), pytest.param("tiny_v_reference", id="tinyv")]


def theirs_pipeline(ref):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ref.folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layers_of(model: torch.nn.Module, wanted: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(wanted)}


def random_lora(theirs, *, seed: int, rank: int = 4, alpha: float | None = 3.0, fmt: str = "kohya",
                zero_up: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA state dict with random (nonzero) down/up weights for the diffusers models' layers.
    fmt "kohya": `lora_unet_<path with _>.lora_down.weight` ... + `.alpha` (text encoder under
    transformers' historical `text_model.` name, as kohya writes it); "peft": `unet.<path>.lora_A.weight`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    layers = [("unet", n, m) for n, m in layers_of(theirs.unet, UNET_LAYERS).items()]
    layers += [("te", n, m) for n, m in layers_of(theirs.text_encoder, TEXT_LAYERS).items()]
    for model, name, module in layers:
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *(1,) * (w.ndim - 2), generator=g) * 0.5
        up = torch.zeros_like(up) if zero_up else up
        if fmt == "kohya":
            key = f"lora_unet_{name}" if model == "unet" else f"lora_te_text_model.{name}"
            key = key.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            key = f"unet.{name}" if model == "unet" else f"text_encoder.{name}"
            sd |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    return sd


def inputs(ours, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.0])
    context = torch.randn(2, 77, ours.config.unet.context_dim, generator=g)
    tokens = ours.tokenizer(PROMPTS, pad_id=ours.config.clip.pad_token_id)
    return x, t, context, tokens


@torch.no_grad()
def outputs_ours(ours, x, t, context, tokens):
    return ours.unet(x, t, context), ours.clip(tokens)


@torch.no_grad()
def outputs_theirs(theirs, x, t, context, tokens):
    return theirs.unet(x, t, encoder_hidden_states=context).sample, theirs.text_encoder(tokens).last_hidden_state


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(params=REFERENCES)
def pair(request):
    """(sdtorch pipeline, diffusers pipeline, reference) on the same random weights, fp32."""
    ref = request.getfixturevalue(request.param)
    return sdtorch.load(ref.checkpoint, config=ref.preset), theirs_pipeline(ref), ref


def compare(ours, theirs, parity_log, label: str) -> tuple[float, float]:
    args = inputs(ours)
    (u, c), (u_ref, c_ref) = outputs_ours(ours, *args), outputs_theirs(theirs, *args)
    return (parity_log(f"lora {label} unet max_abs", max_abs(u, u_ref)),
            parity_log(f"lora {label} text max_abs", max_abs(c, c_ref)))


def test_kohya_file_matches_diffusers(pair, tmp_path, parity_log):
    ours, theirs, _ = pair
    path = tmp_path / "kohya.safetensors"
    save_file(random_lora(theirs, seed=1), path)
    base = outputs_ours(ours, *inputs(ours))
    theirs.load_lora_weights(str(path))
    applied = ours.load_lora(path)
    assert len(applied.network.targets) == len(load_file(path)) // 3
    changed = outputs_ours(ours, *inputs(ours))
    assert min(max_abs(a, b) for a, b in zip(changed, base)) > 0.05  # the LoRA does something
    assert max(compare(ours, theirs, parity_log, "kohya dynamic")) <= 1e-5
    theirs.fuse_lora()
    ours.loras.merge(applied)
    assert max(compare(ours, theirs, parity_log, "kohya fused")) <= 1e-5


def test_peft_file_matches_diffusers(pair, tmp_path, parity_log):
    """diffusers' own format: lora_A/lora_B, the scale from its `lora_adapter_metadata` (a
    LoraConfig per model, with a per-layer alpha_pattern), text encoder without `text_model.`."""
    ours, theirs, _ = pair
    sd = random_lora(theirs, seed=2, fmt="peft")
    unet_targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in sd if k.startswith("unet.")})
    te_targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in sd if k.startswith("text_encoder.")})
    meta = {"unet.r": 4, "unet.lora_alpha": 3.0, "unet.alpha_pattern": {"ff.net.0.proj": 8.0},
            "unet.target_modules": unet_targets,
            "text_encoder.r": 4, "text_encoder.lora_alpha": 6.0, "text_encoder.target_modules": te_targets}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, path, metadata={"format": "pt", lora.PEFT_METADATA: json.dumps(meta)})
    theirs.load_lora_weights(str(path))
    applied = ours.load_lora(path)
    scales = {target[1]: lo.scale for target, lo in zip(applied.network.targets, applied.network.loras)}
    for suffix, scale in (("ff.net.0.proj", 2.0), ("ff.net.2", 0.75), ("attn1.to_q", 0.75), ("self_attn.q_proj", 1.5)):
        assert {v for k, v in scales.items() if k.endswith(suffix)} == {scale}, suffix
    assert max(compare(ours, theirs, parity_log, "peft dynamic")) <= 1e-5
    theirs.fuse_lora()
    ours.loras.merge(applied)
    assert max(compare(ours, theirs, parity_log, "peft fused")) <= 1e-5


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft: a second adapter
def test_two_loras_with_strengths_match_diffusers(tiny_reference, tmp_path, parity_log):
    ours = sdtorch.load(tiny_reference.checkpoint, config=TINY)
    theirs = theirs_pipeline(tiny_reference)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file(random_lora(theirs, seed=3), paths[0])
    save_file(random_lora(theirs, seed=4, rank=2, alpha=None, fmt="peft"), paths[1])  # no alpha: scale 1
    for path, name in zip(paths, "ab"):
        theirs.load_lora_weights(str(path), adapter_name=name)
    theirs.set_adapters(["a", "b"], adapter_weights=[0.6, -0.8])
    ours.load_lora(paths[0], 0.6)
    ours.load_lora(paths[1], -0.8)
    assert max(compare(ours, theirs, parity_log, "two loras")) <= 1e-5


def test_file_sdtorch_writes_loads_in_diffusers(tiny_reference, tmp_path, parity_log):
    """lora.save (kohya format) -> diffusers and sdtorch read the same function."""
    ours = sdtorch.load(tiny_reference.checkpoint, config=TINY)
    network = lora_train.new_network(ours.unet, ours.clip, rank=4, alpha=2.0, layers=tuple(lora.LAYERS),
                               text_encoder=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lo in network.loras:
            lo.up.normal_(0, 0.3, generator=torch.Generator().manual_seed(lo.up.numel()))
    path = lora_train.save(network, tmp_path / "mine.safetensors", TINY.unet)
    keys = list(load_file(path))
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    meta = safe_open(str(path), "pt").metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    back = ours.load_lora(path).network
    mine = dict(zip(network.targets, network.loras))
    assert sorted(back.targets) == sorted(mine)  # (a file's keys come back sorted)
    for target, a in zip(back.targets, back.loras):
        b = mine[target]
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.alpha == b.alpha
    theirs = theirs_pipeline(tiny_reference)
    theirs.load_lora_weights(str(path))
    assert max(compare(ours, theirs, parity_log, "sdtorch-written")) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Applying, merging, strength (sdtorch alone)


@pytest.fixture
def tiny(tiny_reference):
    return sdtorch.load(tiny_reference.checkpoint, config=TINY)


@pytest.fixture(scope="module")
def kohya_sd(tiny_reference) -> dict[str, torch.Tensor]:
    return random_lora(theirs_pipeline(tiny_reference), seed=5)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in (("unet", pipe.unet), ("clip", pipe.clip)) for k, v in m.state_dict().items()}


def test_zero_up_lora_is_the_identity(tiny, tiny_reference, tmp_path):
    path = tmp_path / "zero.safetensors"
    save_file(random_lora(theirs_pipeline(tiny_reference), seed=6, zero_up=True), path)
    before, w0 = outputs_ours(tiny, *inputs(tiny)), weights(tiny)
    applied = tiny.load_lora(path, strength=3.0)
    for a, b in zip(outputs_ours(tiny, *inputs(tiny)), before):
        assert torch.equal(a, b)
    tiny.loras.merge(applied)
    assert all(torch.equal(v, w0[k]) for k, v in weights(tiny).items())
    for a, b in zip(outputs_ours(tiny, *inputs(tiny)), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_then_unmerge_restores_the_weights_bit_for_bit(tiny_reference, kohya_sd, dtype):
    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY, dtype=dtype)
    w0 = weights(pipe)
    a = pipe.loras.add(lora.load(kohya_sd, pipe.unet, pipe.clip, dtype=dtype), 0.7, merge=True)
    pipe.loras.add(lora.load(kohya_sd, pipe.unet, pipe.clip, dtype=dtype), 2.0)  # dynamic, in between
    flipped = {k: -v if k.endswith("lora_up.weight") else v for k, v in kohya_sd.items()}
    c_net = lora.load(flipped, pipe.unet, pipe.clip, dtype=dtype)
    pipe.loras.add(c_net, 1.3, merge=True)
    assert not all(torch.equal(v, w0[k]) for k, v in weights(pipe).items())
    pipe.loras.remove(a)  # the merge after it is undone, `a` unmerged, the later one merged again
    for (model, path), lo in zip(c_net.targets, c_net.loras):
        w = w0[f"{model}.{path}.weight"]
        expected = (w.float() + 1.3 * lo.delta_weight()).to(dtype)  # c merged alone onto the base
        assert torch.equal(getattr(pipe, model).get_submodule(path).weight, expected), path
    pipe.unload_loras()
    assert not pipe.loras.applied
    assert all(torch.equal(v, w0[k]) for k, v in weights(pipe).items())
    assert not any(m._forward_hooks for m in pipe.unet.modules())


def test_dynamic_and_merged_agree(tiny, kohya_sd):
    applied = tiny.loras.add(lora.load(kohya_sd, tiny.unet, tiny.clip), 0.8)
    dynamic = outputs_ours(tiny, *inputs(tiny))
    tiny.loras.merge(applied)
    assert not any(m._forward_hooks for m in tiny.unet.modules())
    merged = outputs_ours(tiny, *inputs(tiny))
    assert max_abs(dynamic[0], merged[0]) <= 1e-5 * dynamic[0].abs().max()
    assert max_abs(dynamic[1], merged[1]) <= 1e-5 * dynamic[1].abs().max()
    tiny.loras.unmerge(applied)
    again = outputs_ours(tiny, *inputs(tiny))
    assert torch.equal(again[0], dynamic[0]) and torch.equal(again[1], dynamic[1])


def test_strength_scales_the_update(tiny, kohya_sd):
    network = lora.load(kohya_sd, tiny.unet, tiny.clip)
    (_, path), lo = next((t, lo) for t, lo in zip(network.targets, network.loras) if t[1].endswith("proj_in"))
    layer = tiny.unet.get_submodule(path)  # a 1x1 conv in SD1
    x = torch.randn(1, layer.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = layer(x)
        deltas = {}
        for s in (0.0, 1.0, 2.5, -1.0):
            applied = tiny.loras.add(network, s)
            deltas[s] = layer(x) - y0
            tiny.loras.remove(applied)
        assert torch.equal(deltas[0.0], torch.zeros_like(y0))
        for s in (2.5, -1.0):
            assert torch.allclose(deltas[s], s * deltas[1.0], atol=1e-6)
        expected = torch.nn.functional.conv2d(x, lo.delta_weight())  # scale * up @ down as a 1x1 conv
        assert torch.allclose(deltas[1.0], expected, atol=1e-5)
    assert lo.scale == 0.75  # alpha 3 / rank 4


def test_kohya_original_layout_names_and_pt_files_load_the_same(tiny, kohya_sd, tmp_path):
    """UNet keys in the LDM layout (`lora_unet_input_blocks_...`) and a .pt pickle read the same."""
    names = lora.layer_names(tiny.unet, tiny.clip)
    renamed = {}
    for key, value in kohya_sd.items():
        group, _, suffix = key.partition(".")
        model, path = names[group]
        renamed[(lora._kohya("unet", path) if model == "unet" else group) + "." + suffix] = value
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    torch.save(renamed, tmp_path / "ldm.pt")
    a = lora.load(kohya_sd, tiny.unet, tiny.clip)
    b = lora.load(tmp_path / "ldm.pt", tiny.unet, tiny.clip)
    assert a.targets == b.targets and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_files_are_rejected_clearly(tiny, kohya_sd, tmp_path):
    def load(sd):
        return lora.load(sd, tiny.unet, tiny.clip)

    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    one = {k: v for k, v in kohya_sd.items() if k.startswith(key + ".")}
    assert len(load(one).targets) == 1
    with pytest.raises(lora.LoRAError, match="match no LoRA layer.*lora_unet_down_blocks_9_nothing"):
        load(one | {"lora_unet_down_blocks_9_nothing.lora_down.weight": torch.zeros(4, 64)})
    with pytest.raises(lora.LoRAError, match="match no LoRA layer.*model.diffusion_model.out.2.weight"):
        load(one | {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)})
    with pytest.raises(lora.LoRAError, match="LyCORIS LoHa"):
        load({f"{key}.hada_w1_a": torch.zeros(64, 4), f"{key}.hada_w1_b": torch.zeros(4, 64)})
    with pytest.raises(lora.LoRAError, match="no up weight"):
        load({k: v for k, v in one.items() if "lora_up" not in k})
    with pytest.raises(lora.LoRAError, match=r"do not fit the layer's weight \(64, 64\)"):
        load(one | {f"{key}.lora_down.weight": torch.zeros(4, 65)})
    ldm = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # the same layer, original layout
    with pytest.raises(lora.LoRAError, match="both adapt input_blocks.3.1.transformer_blocks.0.attn1.to_q"):
        load(one | {k.replace(key, ldm): v for k, v in one.items()})
    with pytest.raises(lora.LoRAError, match="no tensors"):
        load({})
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt"):
        lora.load(tmp_path / "corrupt.safetensors", tiny.unet, tiny.clip)
    torch.save(Evil(), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        lora.load(tmp_path / "evil.pt", tiny.unet, tiny.clip)
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        tiny.load_lora(tmp_path / "missing.safetensors")
    assert not tiny.loras.applied


class Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_resolve_lora_and_prompt_loader(tiny, kohya_sd, tmp_path):
    save_file(kohya_sd, tmp_path / "style.safetensors")
    (tmp_path / "sub").mkdir()
    torch.save(kohya_sd, tmp_path / "sub" / "other.pt")
    assert lora.resolve_lora("style", tmp_path) == tmp_path / "style.safetensors"
    assert lora.resolve_lora("other", tmp_path) == tmp_path / "sub" / "other.pt"
    with pytest.raises(FileNotFoundError, match="no LoRA named 'nope'.*other, style"):
        lora.resolve_lora("nope", tmp_path)
    loader = lora_prompt.PromptLoRAs(tiny, tmp_path)
    loader([("style", 0.5), ("other", 1.0)])
    assert [a.strength for a in tiny.loras.applied] == [0.5, 1.0]
    network = loader.networks["style"]
    loader([("style", 0.8)])
    assert len(tiny.loras.applied) == 1 and tiny.loras.applied[0].network is network  # read once
    loader([])
    assert not tiny.loras.applied


def test_cli_generate_with_lora(tiny_file, kohya_sd, tmp_path, capsys):
    from sdtorch.cli import main

    save_file(kohya_sd, tmp_path / "style.safetensors")
    common = ["generate", "a red circle", "-c", str(tiny_file), "--steps", "2", "--width", "32", "--height", "32",
              "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--lora", f"{tmp_path / 'style.safetensors'}:0.8", "--out", str(tmp_path / "lora")]) == 0
    a, b = (Image.open(next((tmp_path / d).glob("*.png"))) for d in ("plain", "lora"))
    assert a.tobytes() != b.tobytes()
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert main([*common, "--lora", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]


def test_cli_prompt_lora_tag_equals_lora_option(tiny_file, kohya_sd, tmp_path):
    """`<lora:style:0.8>` with --lora-dir is the same image as --lora style.safetensors:0.8 (the
    tag is removed from the text that is encoded)."""
    from sdtorch.cli import main

    (tmp_path / "loras").mkdir()
    save_file(kohya_sd, tmp_path / "loras" / "style.safetensors")
    common = ["-c", str(tiny_file), "--steps", "2", "--width", "32", "--height", "32", "--seed", "1"]
    assert main(["generate", "a red circle <lora:style:0.8>", *common, "--lora-dir", str(tmp_path / "loras"),
                 "--out", str(tmp_path / "tag")]) == 0
    assert main(["generate", "a red circle", *common, "--lora", f"{tmp_path / 'loras' / 'style.safetensors'}:0.8",
                 "--out", str(tmp_path / "option")]) == 0
    assert main(["generate", "a red circle", *common, "--out", str(tmp_path / "plain")]) == 0
    tag, option, plain = (Image.open(next((tmp_path / d).glob("*.png"))).tobytes() for d in ("tag", "option", "plain"))
    assert tag == option != plain


# ---------------------------------------------------------------------------------------------
# Training


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 30)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """8 captioned 32x32 pictures: a coloured circle or square on white."""
    root = tmp_path_factory.mktemp("lora_shapes")
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            im = Image.new("RGB", (32, 32), "white")
            (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)((6, 6, 25, 25), fill=rgb)
            im.save(root / f"{colour}_{shape}.png")
            lines.append(json.dumps({"file_name": f"{colour}_{shape}.png", "text": f"a {colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_lora_job_lowers_the_loss_and_exports_a_kohya_file(tiny_file, shapes, tmp_path):
    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.jobs import LoRAJob
    from sdtorch.training.train import Stream, TrainConfig, micro_batch, train

    pipe = sdtorch.load(tiny_file)
    w0 = weights(pipe)
    network = lora_train.new_network(pipe.unet, pipe.clip, rank=4, layers=("attn", "ff", "proj", "conv"),
                               text_encoder=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(lo.up, torch.zeros_like(lo.up)) for lo in network.loras)  # starts as the identity
    data = ImageCaptionDataset(shapes, 32)
    job = LoRAJob(pipe.config, pipe.unet, pipe.vae, pipe.clip, network)
    held_out = [micro_batch(data, Stream(len(data), 7), s, 0, TrainConfig(out="", batch_size=8, seed=7)) for s in range(4)]

    @torch.no_grad()
    def loss() -> float:  # the same noise and timesteps every time
        return sum(job.loss(b | {"models": job.modules}, s)[0].item() for b, s in held_out) / len(held_out)

    before = loss()
    cfg = TrainConfig(out=str(tmp_path), steps=15, batch_size=8, lr=1e-2, warmup=2, ema_decay=0, save_every=15)
    ema = train(job, data, cfg, progress=False)
    after = loss()
    assert after < 0.75 * before, (before, after)
    assert all(torch.equal(v, w0[k]) for k, v in weights(pipe).items())  # the base model stays frozen

    path = job.export(ema, tmp_path / "lora.safetensors")
    assert path.stat().st_size < 500_000
    x, t, context, tokens = inputs(pipe)
    with torch.no_grad():
        trained = pipe.unet(x, t, context), pipe.clip(tokens)  # the training network is still hooked in
    fresh = sdtorch.load(tiny_file)
    base = outputs_ours(fresh, x, t, context, tokens)
    fresh.load_lora(path)
    loaded = outputs_ours(fresh, x, t, context, tokens)
    assert max_abs(loaded[0], base[0]) > 1e-3 and max_abs(loaded[1], base[1]) > 1e-3
    assert torch.equal(loaded[0], trained[0]) and torch.equal(loaded[1], trained[1])


def test_train_lora_command(tiny_file, shapes, tmp_path):
    from sdtorch.cli import main

    out = tmp_path / "run"
    assert main(["train", "lora", "--checkpoint", str(tiny_file), "--data", str(shapes), "--size", "32",
                 "--rank", "4", "--alpha", "1", "--layers", "attn,ff", "--steps", "3", "--batch-size", "4",
                 "--save-every", "3", "--sample-every", "3", "--prompts", "a red circle", "--out", str(out)]) == 0
    path = out / "lora.safetensors"
    meta = safe_open(str(path), "pt").metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1" and meta["ss_base_model_version"] == "sd_v1"
    assert (out / "samples" / "step_0000003.png").exists()
    assert main(["generate", "a red circle", "-c", str(tiny_file), "--steps", "2", "--width", "32", "--height", "32",
                 "--lora", f"{path}:0.5", "--out", str(tmp_path / "images")]) == 0
