"""A1111's Extras upscaling over HTTP (/sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images):
sizes as A1111 computes them, the built-in filters, blending a second upscaler, the crop, the
PNG text, the batch form, and bad requests answered with a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import NOT_AN_IMAGE, make_service, png_b64  # noqa: E402

from sdtorch.serve.app import create_app  # noqa: E402

SINGLE = "/sdapi/v1/extra-single-image"


def picture(w: int = 40, h: int = 24, text: str | None = None) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if text is not None:
        image.info["parameters"] = text
    return image


def with_text(image: Image.Image, text: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    service = make_service(tmp_path_factory.mktemp("extras"))
    with TestClient(create_app(service)) as c:
        yield c
    service.stop()


def test_lanczos_scale_by_keeps_the_infotext_and_writes_postprocessing(client):
    source = picture()
    r = client.post(SINGLE, json={"image": with_text(source, "a red apple\nSteps: 6"), "upscaler_1": "Lanczos",
                                  "upscaling_resize": 2.5})
    assert r.status_code == 200, r.text
    body = r.json()
    got = decoded(body["image"])
    assert got.size == (96, 56)  # 100 x 60 rounded down to multiples of 8, as A1111 does
    want = source.resize((100, 60), Image.LANCZOS).resize((96, 56), Image.LANCZOS)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert got.info["parameters"] == "a red apple\nSteps: 6"
    assert got.info["postprocessing"] == "Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos"
    assert body["html_info"] == "<p>Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos</p>"


def test_none_returns_the_image_unchanged(client):
    source = picture()
    r = client.post(SINGLE, json={"image": png_b64(source), "upscaling_resize": 4})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.asarray(decoded(r.json()["image"])), np.asarray(source))


def test_scale_to_with_crop_and_a_blended_second_upscaler(client):
    source = picture()
    body = {"image": png_b64(source), "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
            "upscaling_crop": True, "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.25}
    r = client.post(SINGLE, json=body)
    assert r.status_code == 200, r.text
    got = decoded(r.json()["image"])
    scale = 64 / 24  # covers 64 x 64: the height decides
    size = (int(40 * scale), int(24 * scale))  # (106, 64)
    dest = (size[0] // 8 * 8, size[1] // 8 * 8)  # (104, 64)
    first = source.resize(size, Image.NEAREST).resize(dest, Image.LANCZOS)
    second = source.resize(size, Image.LANCZOS).resize(dest, Image.LANCZOS)
    blended = Image.blend(first, second, 0.25)
    canvas = Image.new("RGB", (64, 64))
    canvas.paste(blended, (32 - 52, 0))
    assert got.size == (64, 64)
    assert np.array_equal(np.asarray(got), np.asarray(canvas))
    assert "Postprocess upscale to: 64x64" in got.info["postprocessing"]
    assert "Postprocess upscaler 2: Lanczos, Postprocess crop to: 64x64" in got.info["postprocessing"]


def test_batch_images_and_show_extras_results(client):
    images = [picture(16, 16), picture(24, 8)]
    body = {"imageList": [{"data": png_b64(im), "name": f"im{n}"} for n, im in enumerate(images)],
            "upscaler_1": "Lanczos", "upscaling_resize": 2}
    r = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert r.status_code == 200, r.text
    assert [decoded(s).size for s in r.json()["images"]] == [(32, 32), (48, 16)]
    r = client.post("/sdapi/v1/extra-batch-images", json={**body, "show_extras_results": False})
    assert r.status_code == 200 and r.json()["images"] == []


BAD = [
    ("unknown upscaler", {"upscaler_1": "ESRGAN_4x"}, "upscaler_1"),
    ("unknown second upscaler", {"upscaler_1": "Lanczos", "upscaler_2": "SwinIR 4x",
                                 "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
    ("face restoration", {"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "gfpgan_visibility"),
    ("codeformer", {"codeformer_visibility": 1}, "codeformer_visibility"),
    ("not an image", {"image": NOT_AN_IMAGE, "upscaler_1": "Lanczos"}, "not an image"),
    ("no image", {"image": "", "upscaler_1": "Lanczos"}, "image"),
    ("scale zero", {"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize"),
    ("result too large", {"image": png_b64(Image.new("RGB", (1100, 1100))), "upscaler_1": "Lanczos",
                          "upscaling_resize": 8}, "pixels"),
    ("unknown field", {"upscaler": "Lanczos"}, "upscaler"),
    ("resize mode 2", {"resize_mode": 2}, "resize_mode"),
]


def test_bad_extras_requests_get_a_4xx_naming_the_field(client):
    image = png_b64(picture(64, 64))
    for name, body, needle in BAD:
        r = client.post(SINGLE, json={"image": image} | body)
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert needle in json.dumps(r.json()["detail"]), (name, r.json())
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": []})
    assert r.status_code == 422 and "imageList" in r.text
    r = client.post(SINGLE, json={"image": image, "upscaler_1": "Lanczos"})
    assert r.status_code == 200
