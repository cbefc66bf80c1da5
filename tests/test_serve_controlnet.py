"""sd-webui-controlnet's API on `sdtorch serve` (a real process on 127.0.0.1, the built-in model and
a random ControlNet for it): the unmodified `webuiapi` client's ControlNet calls, the same image as
the Python API, the infotext, the detected map, and refused units. All traffic is loopback."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from serve_util import request, serve_args, start, stop

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("cv2")

from sdtorch.adapters.control import ControlUnit  # noqa: E402
from sdtorch.conditioning.preprocess import preprocess  # noqa: E402
from sdtorch.formats import controlnet as cn_format  # noqa: E402
from sdtorch.generate import GenerationRequest, load  # noqa: E402
from sdtorch.generate.infotext import parse_infotext  # noqa: E402
from sdtorch.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402

PROMPT = dict(prompt="a red apple", seed=11, steps=4, sampler_name="Euler", width=64, height=64, cfg_scale=6)


def save_controlnet(path, unet_cfg, seed: int) -> None:
    torch.manual_seed(seed)
    net = ControlNet(ControlNetConfig(unet_cfg, embed_channels=(16, 32, 64)))  # 4x down: the built-in VAE's
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))


def old_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def shape_image() -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 8, 52, 56), fill="black")
    return im


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def builtin():
    return load()


@pytest.fixture(scope="module")
def live(tmp_path_factory, builtin):
    root = tmp_path_factory.mktemp("cn")
    cn_dir = root / "ControlNet"
    cn_dir.mkdir()
    save_controlnet(cn_dir / "cn_emoji.safetensors", builtin.config.unet, seed=3)
    other = replace(builtin.config.unet, context_dim=768, model_channels=32, channel_mult=(1, 2))
    save_controlnet(cn_dir / "cn_other.safetensors", other, seed=4)
    p = start(serve_args(root / "data", "--controlnet-dir", str(cn_dir)))
    host, port = p.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host, int(port))
    yield p.url, api, cn_dir
    assert stop(p.proc) == 0, p.text


def test_webuiapi_controlnet_matches_the_python_api(live, builtin):
    url, api, cn_dir = live
    title = f"cn_emoji [{old_hash(cn_dir / 'cn_emoji.safetensors')}]"
    assert sorted(api.controlnet_model_list()) == sorted([title, f"cn_other [{old_hash(cn_dir / 'cn_other.safetensors')}]"])
    assert {"none", "canny", "invert", "blur_gaussian", "tile_resample"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 2

    source = shape_image()
    unit = webuiapi.ControlNetUnit(image=source, module="canny", model=title, weight=0.8, threshold_a=100,
                                   threshold_b=200, processor_res=64, guidance_end=0.75)
    # Each call gets its own alwayson_scripts: webuiapi would otherwise store the units in its
    # default dict, and every later call in this process (other tests' too) would send them.
    r = api.txt2img(**PROMPT, controlnet_units=[unit], alwayson_scripts={})
    assert len(r.images) == 2  # the image, then the detected map (save_detected_map defaults to True)
    edges = preprocess("canny", source, 100, 200)
    assert np.array_equal(pixels(r.images[1]), pixels(edges))

    model = cn_format.load(cn_dir / "cn_emoji.safetensors", builtin.config.unet)
    ours = builtin.run(GenerationRequest(
        prompt=PROMPT["prompt"], seed=PROMPT["seed"], steps=4, sampler="euler", scheduler="automatic", width=64,
        height=64, cfg_scale=6, seed_mode="a1111", controls=(ControlUnit(model, edges, 0.8, 0.0, 0.75, "balanced", "fill", module="canny"),)))
    assert np.array_equal(pixels(r.image), pixels(ours.images[0])), "the server and the Python API disagree"
    plain = api.txt2img(**PROMPT, alwayson_scripts={})
    assert np.abs(pixels(plain.image) - pixels(r.image)).max() > 5  # the ControlNet acted

    fields = parse_infotext(r.info["infotexts"][0])
    assert fields["ControlNet 0"] == (f"Module: canny, Model: {title}, Weight: 0.8, Resize Mode: Resize and Fill, "
                                      "Guidance Start: 0.0, Guidance End: 0.75, Control Mode: Balanced")
    assert fields["Seed"] == "11" and fields["Steps"] == "4"

    detected = api.controlnet_detect([source], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    assert len(detected.images) == 1 and np.array_equal(pixels(detected.image), pixels(edges))


def test_img2img_unit_without_an_image_is_controlled_by_the_init_image(live):
    _, api, cn_dir = live
    title = "cn_emoji"  # the name alone also finds it
    init = shape_image()
    common = dict(images=[init], prompt="an apple", seed=2, steps=4, width=64, height=64, denoising_strength=0.8)
    given = api.img2img(**common, controlnet_units=[webuiapi.ControlNetUnit(image=init, model=title)],
                        alwayson_scripts={})
    implied = api.img2img(**common, controlnet_units=[webuiapi.ControlNetUnit(model=title)], alwayson_scripts={})
    assert len(given.images) == len(implied.images) == 1  # module "none": no map
    assert np.array_equal(pixels(given.image), pixels(implied.image))


def test_bad_units_are_refused_by_name(live):
    url, _, _ = live
    image = webuiapi.raw_b64_img(shape_image())
    base = {"prompt": "x", "steps": 2, "width": 64, "height": 64}

    def unit(**kw):
        return {**base, "alwayson_scripts": {"controlnet": {"args": [{"image": image, "model": "cn_emoji", **kw}]}}}

    cases = [
        (unit(model="cn_missing"), "cn_missing"),
        (unit(module="depth_midas"), "depth_midas"),
        (unit(resize_mode=7), "resize_mode"),
        (unit(control_mode="Loud"), "control_mode"),
        (unit(wieght=1), "wieght"),
        (unit(image=None), "needs an image"),
        (unit(model="None"), "model_list"),
        (unit(mask=image), "masks are for the inpaint modules"),
        (unit(module="inpaint"), "needs a mask"),
        (unit(module="inpaint_only", mask=image), "inpaint_only keeps the unmasked pixels"),
        ({**base, "alwayson_scripts": {"controlnet": {"args": ["canny"]}}}, "object"),
        ({**base, "alwayson_scripts": {"adetailer": {"args": []}}}, "adetailer"),
        ({**base, "enable_hr": True, **unit(hr_option="Low res only")}, "hr_option"),
    ]
    for body, needle in cases:
        status, out = request("POST", f"{url}/sdapi/v1/txt2img", body)
        assert status == 422 and needle in out["detail"], (needle, status, out)
    status, out = request("POST", f"{url}/sdapi/v1/txt2img", unit(model="cn_other"))
    assert status == 500 and "cannot control" in out["detail"], out  # another family: refused when loaded
    status, out = request("POST", f"{url}/sdapi/v1/txt2img", unit(enabled=False, model="cn_missing"))
    assert status == 200 and len(out["images"]) == 1  # a disabled unit is not read


def test_inpaint_units_take_their_mask_or_the_inpainting_requests(live, builtin):
    _, api, cn_dir = live
    source = shape_image()
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    unit = webuiapi.ControlNetUnit(image=source, mask=mask, module="inpaint", model="cn_emoji", weight=0.9)
    r = api.txt2img(**PROMPT, controlnet_units=[unit], alwayson_scripts={})
    assert len(r.images) == 2  # the image, then the map: the masked part black
    assert pixels(r.images[1])[32, 32].tolist() == [0, 0, 0] and pixels(r.images[1])[2, 2].tolist() == [255] * 3
    model = cn_format.load(cn_dir / "cn_emoji.safetensors", builtin.config.unet)
    ours = builtin.run(GenerationRequest(
        prompt=PROMPT["prompt"], seed=PROMPT["seed"], steps=4, sampler="euler", scheduler="automatic", width=64,
        height=64, cfg_scale=6, seed_mode="a1111",
        controls=(ControlUnit(model, source, 0.9, resize="fill", module="inpaint", mask=mask),)))
    assert np.array_equal(pixels(r.image), pixels(ours.images[0])), "the server and the Python API disagree"
    assert parse_infotext(r.info["infotexts"][0])["ControlNet 0"].startswith("Module: inpaint, Model: cn_emoji [")

    common = dict(images=[source], mask_image=mask, prompt="an apple", seed=2, steps=4, width=64, height=64,
                  denoising_strength=0.9, mask_blur=0, inpaint_full_res=False)
    implied = api.img2img(**common, controlnet_units=[webuiapi.ControlNetUnit(module="inpaint_only", model="cn_emoji")],
                          alwayson_scripts={})
    given = api.img2img(**common, controlnet_units=[webuiapi.ControlNetUnit(image=source, mask=mask, module="inpaint_only",
                                                                            model="cn_emoji")], alwayson_scripts={})
    plain = api.img2img(**common, alwayson_scripts={})
    assert np.array_equal(pixels(implied.image), pixels(given.image))  # the request's image and mask by default
    assert pixels(implied.image)[2, 2].tolist() == pixels(source)[2, 2].tolist()  # outside the mask: kept
    assert np.abs(pixels(implied.image) - pixels(plain.image)).max() > 0  # the unit acted
