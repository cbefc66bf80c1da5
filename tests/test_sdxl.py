"""SDXL: parity with diffusers' SDXL pipelines on the same random weights (tiny models shaped like
diffusers' own SDXL tests: 3 levels, transformer depth varying per level, two text encoders), the
base -> refiner hand-off both ways, single files read by diffusers' own loader, detection of the
real architectures from their keys and shapes, and the float16 VAE fallback."""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference_models import SCHEDULERS, reference_scheduler

import sdtorch
from sdtorch.conditioning.micro import Micro
from sdtorch.config import SDXL, SDXL_REFINER
from sdtorch.families import describe
from sdtorch.formats import checkpoint
from sdtorch.formats.files import read_state_dict
from sdtorch.generate.pipeline import GenerationParams
from sdtorch.generate.request import GenerationRequest, RequestError
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.generate.handoff import finish_latents
from sdtorch.sampling.schedulers import handoff_index

PROMPT, NEGATIVE = "a red apple on a table", "blurry"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(tiny_xl_reference):
    from diffusers import StableDiffusionXLPipeline

    ref = tiny_xl_reference
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    theirs = _quiet(StableDiffusionXLPipeline.from_pretrained(ref.folder, local_files_only=True))
    yield ours, theirs
    del ours, theirs
    gc.collect()


@pytest.fixture(scope="module")
def refiner(tiny_xl_refiner_reference):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref = tiny_xl_refiner_reference
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    theirs = _quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(ref.folder, local_files_only=True))
    yield ours, theirs
    del ours, theirs
    gc.collect()


def _theirs_latents(theirs, sampler: str, negative: str | None, steps: int = 6, **kw):
    theirs.scheduler = reference_scheduler(sampler, theirs.scheduler.config)
    return theirs(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, height=64,
                  width=64, num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(1234),
                  output_type="latent", **kw).images


@torch.no_grad()
def test_text_encoders(base, parity_log):
    ours, theirs = base
    prompts = ["a photo of an astronaut riding a horse", "", " ".join(["a very long prompt"] * 30)]
    states, pooled = ours.encode_text(prompts, syntax="plain")
    ref_states, _, ref_pooled, _ = theirs.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert states.shape == ref_states.shape == (3, 77, 64)
    assert parity_log("sdxl text states rel_err", rel_err(states, ref_states)) <= 1e-4
    assert parity_log("sdxl pooled text rel_err", rel_err(pooled, ref_pooled)) <= 1e-4
    # A1111 syntax reads a plain short prompt exactly as the reference does, with both encoders
    a1111, a1111_pooled = ours.encode_text(prompts[:2], syntax="a1111")
    assert torch.equal(a1111, states[:2]) and torch.equal(a1111_pooled, pooled[:2])
    # and emphasis changes the states of both encoders, not the pooled text (as A1111)
    emphasized, emphasized_pooled = ours.encode_text(["a photo of an (astronaut:1.5) riding a horse"])
    assert not torch.allclose(emphasized[..., :32], states[:1, :, :32])
    assert not torch.allclose(emphasized[..., 32:], states[:1, :, 32:])
    assert torch.equal(emphasized_pooled, ours.encode_text(["a photo of an astronaut riding a horse"])[1])
    # prompts longer than 75 tokens: chunks of 77 for both encoders
    assert ours.encode_text([prompts[2]])[0].shape == (1, 154, 64)


@torch.no_grad()
def test_unet_step_with_vector(base, parity_log):
    ours, theirs = base
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    pooled, time_ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]])
    t = torch.tensor([981.0, 1.0])
    vector = torch.cat([_micro(ours, pooled[i : i + 1], time_ids[i]) for i in range(2)])
    a = ours.unet(x, t, ctx, vector)
    b = theirs.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert parity_log("sdxl unet rel_err", rel_err(a, b)) <= 1e-4
    with pytest.raises(ValueError, match="takes a vector of 80"):
        ours.unet(x, t, ctx)


def _micro(pipe, pooled, ids):
    from sdtorch.conditioning.micro import micro_vector

    h, w, top, left, th, tw = (int(v) for v in ids)
    return micro_vector(pipe.config, pooled, Micro((h, w), (top, left), (th, tw)))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_txt2img(base, sampler, parity_log):
    ours, theirs = base
    negative = NEGATIVE if sampler != "euler" else ""  # "" = zero negative conditioning, as diffusers' None
    params = GenerationParams(PROMPT, negative, steps=6, sampler=sampler, cfg_scale=7.5, seed=1234, width=64,
                              height=64, batch_size=2)
    a = ours.generate_latents(params, progress=False)
    b = _theirs_latents(theirs, sampler, negative or None)
    assert parity_log("sdxl txt2img latents rel_err", rel_err(a, b)) <= 1e-4
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert parity_log("sdxl txt2img image PSNR dB", psnr(ours.decode(a), image_b), worst=min) >= 45.0


@torch.no_grad()
def test_micro_conditioning(base, parity_log):
    """Non-default sizes and crops, and different ones for the negative side, as diffusers takes them.
    Batch 1: with more images per prompt diffusers repeats its [negative, positive] size rows as
    [neg, pos, neg, pos] against text rows [neg, neg, pos, pos]; sdtorch keeps each row's own."""
    ours, theirs = base
    micro, negative = Micro((512, 384), (16, 8), (64, 64)), Micro((256, 256), (0, 0), (32, 48))
    params = GenerationParams(PROMPT, NEGATIVE, steps=4, sampler="euler", seed=7, width=64, height=64, batch_size=1,
                              micro=micro, negative_micro=negative)
    a = ours.generate_latents(params, progress=False)
    theirs.scheduler = reference_scheduler("euler", theirs.scheduler.config)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               num_images_per_prompt=1, generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
               original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(64, 64),
               negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 0),
               negative_target_size=(32, 48)).images
    assert parity_log("sdxl micro-conditioning latents rel_err", rel_err(a, b)) <= 1e-4
    default = ours.generate_latents(replace(params, micro=None, negative_micro=None), progress=False)
    assert (default - a).abs().max() > 1e-3  # the sizes matter
    # an unset target size is the image's, as diffusers' default
    a = ours.generate_latents(replace(params, micro=Micro((512, 384)), negative_micro=None), progress=False)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(7), output_type="latent", original_size=(512, 384)).images
    assert parity_log("sdxl micro-conditioning latents rel_err", rel_err(a, b)) <= 1e-4


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
@torch.no_grad()
def test_base_to_refiner_handoff(base, refiner, sampler, parity_log):
    """diffusers' denoising_end on the base, denoising_start on the refiner, latents passed."""
    (ours, theirs), (r_ours, r_theirs) = base, refiner
    params = GenerationParams(PROMPT, NEGATIVE, steps=8, sampler=sampler, seed=1234, width=64, height=64, batch_size=2)
    k = handoff_index(sampler, "automatic", 8, ours.config.schedule, 0.7)
    assert 0 < k < 8
    noisy = ours.generate_latents(params, progress=False, stop=k)
    ref_noisy = _theirs_latents(theirs, sampler, NEGATIVE, steps=8, denoising_end=0.7)
    assert parity_log("sdxl base (denoising_end) latents rel_err", rel_err(noisy, ref_noisy)) <= 1e-4
    a = finish_latents(r_ours, noisy, params, k, progress=False)
    r_theirs.scheduler = reference_scheduler(sampler, r_theirs.scheduler.config)
    b = r_theirs([PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, image=ref_noisy, num_inference_steps=8,
                 guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(1234), output_type="latent",
                 denoising_start=0.7).images
    assert parity_log("sdxl refiner (denoising_start) latents rel_err", rel_err(a, b)) <= 1e-4


@torch.no_grad()
def test_refiner_requests(base, refiner):
    """The same hand-off through requests (diffusers' fields), and A1111's refiner_switch_at in one run:
    for a deterministic sampler at the same split index the two agree."""
    (ours, _), (r_ours, _) = base, refiner
    common = dict(steps=10, sampler="euler", scheduler="automatic", seed=5, width=64, height=64)
    first = ours.run(GenerationRequest(PROMPT, NEGATIVE, denoising_end=0.8, **common))
    second = r_ours.run(GenerationRequest(PROMPT, NEGATIVE, init_latents=first.latents, denoising_start=0.8, **common))
    assert handoff_index("euler", "automatic", 10, ours.config.schedule, 0.8) == 8 == int(10 * 0.8)
    one = ours.run(GenerationRequest(PROMPT, NEGATIVE, refiner=r_ours, refiner_switch_at=0.8, **common))
    assert rel_err(one.latents, second.latents) <= 1e-5
    assert "Refiner: tiny-xl-refiner [" in one.infotexts[0] and "Refiner switch at: 0.8" in one.infotexts[0]
    alone = ours.run(GenerationRequest(PROMPT, NEGATIVE, **common))
    assert (alone.latents - one.latents).abs().max() > 1e-3
    with pytest.raises(RequestError, match="init_latents"):
        r_ours.run(GenerationRequest(PROMPT, init_latents=first.latents, **common))
    with pytest.raises(RequestError, match="denoising_end"):
        ours.run(GenerationRequest(PROMPT, denoising_end=1.5, **common))


@torch.no_grad()
def test_refiner_img2img(refiner, parity_log):
    """The refiner as StableDiffusionXLImg2ImgPipeline: aesthetic scores 6 / 2.5, strength 0.3."""
    ours, theirs = refiner
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    params = GenerationParams(PROMPT, NEGATIVE, steps=10, sampler="euler_a", seed=99, width=64, height=64)
    a = ours.img2img_latents(image, params, 0.3, progress=False)
    theirs.scheduler = reference_scheduler("euler_a", theirs.scheduler.config)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, image=(image + 1) / 2, strength=0.3, num_inference_steps=10,
               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(99), output_type="latent").images
    assert parity_log("sdxl refiner img2img latents rel_err", rel_err(a, b)) <= 1e-4


@torch.no_grad()
def test_inpainting(tiny_xl_inpaint_reference, parity_log):
    from diffusers import StableDiffusionXLInpaintPipeline

    ref = tiny_xl_inpaint_reference
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    theirs = _quiet(StableDiffusionXLInpaintPipeline.from_pretrained(ref.folder, local_files_only=True))
    assert describe(ours.config).endswith("inpainting")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    params = GenerationParams(PROMPT, NEGATIVE, steps=6, sampler="euler", seed=11, width=64, height=64)
    a = ours.inpaint_latents(image, mask, params, progress=False)
    theirs.scheduler = reference_scheduler("euler", theirs.scheduler.config)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, image=(image + 1) / 2, mask_image=mask, strength=1.0, height=64,
               width=64, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(11),
               output_type="latent").images
    assert parity_log("sdxl inpainting latents rel_err", rel_err(a, b)) <= 1e-4


def test_single_file_through_diffusers_loader(tiny_xl_reference, tiny_xl_refiner_reference):
    """The tests' converter writes the original layout; diffusers' own from_single_file reads it back
    to the same UNet, VAE and CLIP-L weights as the folder. diffusers 0.42's from_single_file
    converts OpenCLIP bigG correctly but then leaves the model unloaded under transformers 5 (its
    weights stay at their random init), so bigG goes through diffusers' own converter,
    `convert_open_clip_checkpoint`, directly."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    for ref, cls, parts, bigg in (
        (tiny_xl_reference, StableDiffusionXLPipeline, ("unet", "vae", "text_encoder"), "conditioner.embedders.1.model."),
        (tiny_xl_refiner_reference, StableDiffusionXLImg2ImgPipeline, ("unet", "vae"), "conditioner.embedders.0.model."),
    ):
        single = cls.from_single_file(ref.checkpoint, config=str(ref.folder), local_files_only=True)
        folder = cls.from_pretrained(ref.folder, local_files_only=True)
        for part in parts:
            a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
            keys = [k for k in b if not k.endswith("position_ids")]
            assert keys and all(torch.equal(a[k], b[k]) for k in keys), part
        converted = convert_open_clip_checkpoint(folder.text_encoder_2, read_state_dict(ref.checkpoint)[0], prefix=bigg)
        expected = folder.text_encoder_2.state_dict()
        assert set(converted) == set(expected) and "text_projection.weight" in expected
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_folder_and_single_file_load_the_same(tiny_xl_reference):
    ref = tiny_xl_reference
    folder = sdtorch.load(ref.folder)
    single = sdtorch.load(ref.checkpoint, config=ref.preset)
    assert replace(folder.config, name=ref.preset.name) == ref.preset
    for a, b in ((folder.unet, single.unet), (folder.clip, single.clip), (folder.clip2, single.clip2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("preset", [SDXL, SDXL_REFINER], ids=["base", "refiner"])
def test_detect_real_architectures(preset):
    """Every number of the real SDXL base and refiner read back from the keys and shapes of their
    single-file layout (meta tensors: nothing is allocated)."""
    from sdtorch.formats import diffusers as convert

    with torch.device("meta"):
        unet, vae = UNetModel(preset.unet), AutoencoderKL(preset.vae)
        clips = [ClipTextModel(c) for c in (preset.clip, preset.clip2) if c is not None]
    sd = convert.original_keys(unet.state_dict(), vae.state_dict(), [c.state_dict() for c in clips], preset)
    if preset is SDXL:
        assert "conditioner.embedders.1.model.text_projection" in sd
        assert sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3840, 1280)
        assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    u, v, texts, family = checkpoint.split(sd)
    got = checkpoint._detect(u, v, texts, family, Path(preset.name))
    assert got == preset
    assert describe(got) == {"sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}[preset.name]


@torch.no_grad()
def test_fp16_vae_overflow_decodes_again_in_fp32(tiny_xl_reference, caplog):
    """A VAE that overflows in float16 (as the SDXL VAE does) is decoded again in float32, with a
    warning: never a black image; the loaded VAE stays float16."""
    ours = sdtorch.load(tiny_xl_reference.checkpoint, config=tiny_xl_reference.preset, dtype="fp16")
    ours.vae.post_quant_conv.weight.data *= 1000  # finite weights, activations beyond float16's 65504
    ours.vae.decoder.conv_in.weight.data *= 1000
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(ours.vae.decode(z)).all()  # the overflow is real
    with caplog.at_level(logging.WARNING):
        image = ours.decode(z)
    assert torch.isfinite(image).all() and image.std() > 0
    assert "overflowed" in caplog.text and ours.vae.decoder.conv_in.weight.dtype == torch.float16


def test_server_refiner_checkpoint(tiny_xl_reference, tiny_xl_refiner_reference, tmp_path):
    """A1111's refiner_checkpoint / refiner_switch_at through the HTTP API (the fields as A1111's
    clients post them; webuiapi's txt2img has no refiner arguments): the refiner named in the
    request takes over, its name and hash go into the infotext, and an unknown refiner is a 422
    naming the field."""
    import base64
    import io

    import webuiapi
    from PIL import Image
    from serve_util import free_port, request, serve_args, server

    models = tmp_path / "models"
    models.mkdir()
    for ref in (tiny_xl_reference, tiny_xl_refiner_reference):
        pipe = sdtorch.load(ref.checkpoint, config=ref.preset)
        checkpoint.save(models / f"{ref.preset.name}.safetensors", pipe.unet, pipe.vae, pipe.clip, ref.preset,
                        clip2=pipe.clip2)
    args = serve_args(tmp_path / "data", "--checkpoint", str(models / "tiny-xl.safetensors"), "--models-dir", str(models),
                      port=free_port())
    with server(args) as url:
        host, port = url.removeprefix("http://").split(":")
        common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=6, seed=3, width=64, height=64)
        plain = webuiapi.WebUIApi(host, int(port)).txt2img(**common)
        status, refined = request("POST", f"{url}/sdapi/v1/txt2img",
                                  {**common, "refiner_checkpoint": "tiny-xl-refiner", "refiner_switch_at": 0.5})
        assert status == 200, refined
        info = json.loads(refined["info"])["infotexts"][0]
        assert "Refiner: tiny-xl-refiner [" in info and "Refiner switch at: 0.5" in info
        assert "Refiner" not in plain.info["infotexts"][0]
        image = Image.open(io.BytesIO(base64.b64decode(refined["images"][0])))
        a, b = (torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.float32) for im in (image, plain.image))
        assert a.shape == b.shape and (a - b).abs().max() > 0
        status, body = request("POST", f"{url}/sdapi/v1/txt2img", {**common, "refiner_checkpoint": "nope"})
        assert status == 422 and "refiner_checkpoint" in json_detail(body)
        status, body = request("POST", f"{url}/sdapi/v1/img2img", {**common, "init_images": refined["images"],
                                                                     "refiner_checkpoint": "tiny-xl-refiner"})
        assert status == 422 and "txt2img runs only" in json_detail(body)


def json_detail(body) -> str:
    return str(body.get("detail") if isinstance(body, dict) else body)


def _sdxl_kohya_lora(ours, seed: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA as kohya's sd-scripts writes SDXL ones: UNet layers under their original-layout
    names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), the text encoders as
    `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP bigG), with alphas."""
    g = torch.Generator().manual_seed(seed)
    unet_layers = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2",
                   "proj_in", "proj_out")
    text_layers = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    layers = [("lora_unet_", n, m) for n, m in ours.unet.named_modules() if n.endswith(unet_layers)]
    for prefix, clip in (("lora_te1_", ours.clip), ("lora_te2_", ours.clip2)):
        layers += [(prefix, n, m) for n, m in clip.named_modules() if n.endswith(text_layers)]
    sd = {}
    for prefix, name, module in layers:
        w = module.weight
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.5
        sd[f"{key}.alpha"] = torch.tensor(3.0)
    return sd


@torch.no_grad()
def test_kohya_sdxl_lora_matches_diffusers(tiny_xl_reference, tmp_path, parity_log):
    """An SDXL LoRA in kohya's layout (lora_unet_ in original names, lora_te1_, lora_te2_) loaded by
    diffusers' load_lora_weights and by sdtorch: the same images."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    ref = tiny_xl_reference
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    theirs = _quiet(StableDiffusionXLPipeline.from_pretrained(ref.folder, local_files_only=True))
    path = tmp_path / "xl_lora.safetensors"
    save_file(_sdxl_kohya_lora(ours), path)
    params = GenerationParams(PROMPT, NEGATIVE, steps=4, sampler="euler", seed=21, width=64, height=64)
    before = ours.generate_latents(params, progress=False)
    applied = ours.load_lora(path)
    assert {t[0] for t in applied.network.targets} == {"unet", "clip", "clip2"}
    a = ours.generate_latents(params, progress=False)
    theirs.load_lora_weights(str(path))
    theirs.scheduler = reference_scheduler("euler", theirs.scheduler.config)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(21), output_type="latent").images
    assert (a - before).abs().max() > 0.05  # the LoRA does something
    assert parity_log("sdxl kohya lora latents rel_err", rel_err(a, b)) <= 1e-4
    # the same file on an SD 1 model is refused, saying why
    tiny = sdtorch.load()  # the built-in model
    with pytest.raises(ValueError, match="an SDXL LoRA"):
        tiny.load_lora(path)


@torch.no_grad()
def test_sdxl_embedding_matches_diffusers(base, tmp_path, parity_log):
    """An SDXL textual-inversion file (clip_l + clip_g, two vectors each): its trigger word in an
    A1111 prompt gives the text states diffusers gives with load_textual_inversion on both encoders;
    an SD 1 model refuses the file, saying why."""
    from safetensors.torch import save_file

    ours, theirs = base
    g = torch.Generator().manual_seed(4)
    vectors = {"clip_l": torch.randn(2, 32, generator=g) * 0.02, "clip_g": torch.randn(2, 32, generator=g) * 0.02}
    path = tmp_path / "mystyle.safetensors"
    save_file(vectors, path)
    assert ours.load_embeddings(path) == ["mystyle"]
    a, a_pooled = ours.encode_text(["a photo in mystyle, red"])
    theirs.load_textual_inversion(vectors["clip_l"], token="<mystyle>", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(vectors["clip_g"], token="<mystyle>", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    b, _, b_pooled, _ = theirs.encode_prompt(["a photo in <mystyle>, red"], device="cpu", do_classifier_free_guidance=False)
    assert parity_log("sdxl embedding text states rel_err", rel_err(a, b)) <= 1e-4
    assert rel_err(a_pooled, b_pooled) <= 1e-4
    assert not torch.allclose(a, ours.encode_text(["a photo in style, red"])[0])
    with pytest.raises(ValueError, match="SDXL embedding"):
        sdtorch.load().load_embeddings(path)


def test_lora_training_on_sdxl(tiny_xl_reference, tmp_path):
    """The LoRA trainer on the SDXL family: the loss falls, the base stays frozen, the exported kohya
    file (original-layout UNet names, as kohya's SDXL scripts write) loads in sdtorch to the trained
    function and in diffusers' load_lora_weights; a text-encoder LoRA for two encoders is refused."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image, ImageDraw

    from sdtorch.adapters import lora_train
    from sdtorch.training.data import ImageCaptionDataset
    from sdtorch.training.jobs import LoRAJob
    from sdtorch.training.train import Stream, TrainConfig, micro_batch, train

    lines = []
    for colour in ("red", "blue", "green", "black"):
        for shape in ("circle", "square"):
            im = Image.new("RGB", (32, 32), "white")
            (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)((6, 6, 25, 25), fill=colour)
            im.save(tmp_path / f"{colour}_{shape}.png")
            lines.append(json.dumps({"file_name": f"{colour}_{shape}.png", "text": f"a {colour} {shape}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ref = tiny_xl_reference
    pipe = sdtorch.load(ref.checkpoint, config=ref.preset)
    w0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    network = lora_train.new_network(pipe.unet, pipe.clip, rank=4, layers=("attn", "ff", "proj", "conv"),
                                     generator=torch.Generator().manual_seed(0))
    job = LoRAJob(pipe.config, pipe.unet, pipe.vae, pipe.clip, network, clip2=pipe.clip2)
    data = ImageCaptionDataset(tmp_path, 32)
    held_out = [micro_batch(data, Stream(len(data), 7), s, 0, TrainConfig(out="", batch_size=8, seed=7)) for s in range(4)]

    @torch.no_grad()
    def loss() -> float:
        return sum(job.loss(b | {"models": job.modules}, s)[0].item() for b, s in held_out) / len(held_out)

    before = loss()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=40, batch_size=8, lr=1e-2, warmup=2, ema_decay=0, save_every=40)
    ema = train(job, data, cfg, progress=False)
    after = loss()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, w0[k]) for k, v in pipe.unet.state_dict().items())
    path = job.export(ema, tmp_path / "xl_lora.safetensors")
    keys = read_state_dict(path)[0]
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert read_state_dict(path)[1]["ss_base_model_version"] == "sdxl_base_v1-0"
    params = GenerationParams(PROMPT, NEGATIVE, steps=3, sampler="euler", seed=1, width=32, height=32)
    trained = pipe.generate_latents(params, progress=False)  # the training network is still hooked in
    fresh = sdtorch.load(ref.checkpoint, config=ref.preset)
    plain = fresh.generate_latents(params, progress=False)
    fresh.load_lora(path)
    loaded = fresh.generate_latents(params, progress=False)
    assert (loaded - plain).abs().max() > 1e-3 and rel_err(loaded, trained) <= 1e-5
    theirs = _quiet(StableDiffusionXLPipeline.from_pretrained(ref.folder, local_files_only=True))
    theirs.load_lora_weights(str(path))
    theirs.scheduler = reference_scheduler("euler", theirs.scheduler.config)
    b = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
               generator=torch.Generator("cpu").manual_seed(1), output_type="latent").images
    assert rel_err(loaded, b) <= 1e-4
    text = lora_train.new_network(pipe.unet, pipe.clip, rank=2, text_encoder=True)
    with pytest.raises(ValueError, match="two text encoders"):
        LoRAJob(pipe.config, pipe.unet, pipe.vae, pipe.clip, text, clip2=pipe.clip2)
