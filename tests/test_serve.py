"""The server in-process (FastAPI's TestClient, the built-in model): bad requests answered with a
4xx naming the problem while the server keeps serving, the jobs API, auth, the queue limit,
the store's crash recovery, and the A1111 field translation."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sdtorch.generate import RequestError  # noqa: E402
from sdtorch.serve import a1111  # noqa: E402
from sdtorch.serve.app import create_app  # noqa: E402
from sdtorch.serve.service import Service, Settings  # noqa: E402
from sdtorch.serve.store import Store  # noqa: E402

SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}


def png_b64(image: Image.Image, data_url: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def make_service(tmp_path, **kw) -> Service:
    settings = Settings(data_dir=tmp_path, **kw)
    service = Service(settings)
    service.models.get(service.options["sd_model_checkpoint"])
    service.start()
    return service


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    s = make_service(tmp_path_factory.mktemp("serve"), limits=a1111.Limits(max_pixels=256 * 256 * 4, max_steps=150))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def wait_done(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("completed", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


BOMB = Image.new("1", (12000, 12000))  # 144 M pixels, a few KB as PNG
NOT_AN_IMAGE = base64.b64encode(b"this is not a picture").decode()
RED = Image.new("RGB", (64, 64), (200, 30, 30))

# (name, method, path, json body or raw bytes, expected status, text the detail must contain)
BAD = [
    ("malformed json", "POST", "/sdapi/v1/txt2img", b'{"prompt": "x",', 422, "malformed JSON"),
    ("body is a list", "POST", "/sdapi/v1/txt2img", [1, 2], 422, "body"),
    ("unknown field", "POST", "/sdapi/v1/txt2img", {"promptt": "x"}, 422, "promptt"),
    ("steps not a number", "POST", "/sdapi/v1/txt2img", {"steps": "many"}, 422, "steps"),
    ("steps zero", "POST", "/sdapi/v1/txt2img", {**SMALL, "steps": 0}, 422, "steps"),
    ("steps above max", "POST", "/sdapi/v1/txt2img", {**SMALL, "steps": 151}, 422, "--max-steps"),
    ("width not a multiple of 8", "POST", "/sdapi/v1/txt2img", {**SMALL, "width": 63}, 422, "width"),
    ("too many pixels", "POST", "/sdapi/v1/txt2img", {**SMALL, "width": 512, "height": 512, "batch_size": 2}, 422,
     "--max-pixels"),
    ("batch_size zero", "POST", "/sdapi/v1/txt2img", {**SMALL, "batch_size": 0}, 422, "batch_size"),
    ("n_iter above limit", "POST", "/sdapi/v1/txt2img", {**SMALL, "n_iter": 1000}, 422, "n_iter"),
    ("unknown sampler", "POST", "/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler z"}, 422, "Euler z"),
    ("unknown scheduler", "POST", "/sdapi/v1/txt2img", {**SMALL, "scheduler": "wobbly"}, 422, "wobbly"),
    ("unknown model", "POST", "/sdapi/v1/txt2img",
     {**SMALL, "override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, 422, "nope.safetensors"),
    ("unknown override", "POST", "/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_vae": "x"}}, 422, "sd_vae"),
    ("unknown LoRA", "POST", "/sdapi/v1/txt2img", {**SMALL, "prompt": "cat <lora:missing:0.5>"}, 422, "missing"),
    ("unknown hires upscaler", "POST", "/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "ESRGAN_4x"},
     422, "ESRGAN_4x"),
    ("hires above max pixels", "POST", "/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_scale": 9}, 422,
     "--max-pixels"),
    ("variation strength above 1", "POST", "/sdapi/v1/txt2img", {**SMALL, "subseed_strength": 1.5}, 422,
     "subseed_strength"),
    ("styles without a styles file", "POST", "/sdapi/v1/txt2img", {**SMALL, "styles": ["cinematic"]}, 422,
     "--styles-file"),
    ("face restoration", "POST", "/sdapi/v1/txt2img", {**SMALL, "restore_faces": True}, 422, "restore_faces"),
    ("script", "POST", "/sdapi/v1/txt2img", {**SMALL, "script_name": "x/y/z plot"}, 422, "x/y/z plot"),
    ("always-on script", "POST", "/sdapi/v1/txt2img", {**SMALL, "alwayson_scripts": {"adetailer": {"args": []}}}, 422,
     "adetailer"),
    ("ControlNet unit without a model", "POST", "/sdapi/v1/txt2img",
     {**SMALL, "alwayson_scripts": {"ControlNet": {"args": [{"image": png_b64(RED)}]}}}, 422, "model_list"),
    ("eta on an ancestral sampler", "POST", "/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler a", "eta": 0.3}, 422,
     "eta"),
    ("s_churn", "POST", "/sdapi/v1/txt2img", {**SMALL, "s_churn": 0.5}, 422, "s_churn"),
    ("img2img without image", "POST", "/sdapi/v1/img2img", {**SMALL}, 422, "init_images"),
    ("broken base64", "POST", "/sdapi/v1/img2img", {**SMALL, "init_images": ["%%%notbase64"]}, 422, "init_images"),
    ("not an image", "POST", "/sdapi/v1/img2img", {**SMALL, "init_images": [NOT_AN_IMAGE]}, 422, "not an image"),
    ("decompression bomb", "POST", "/sdapi/v1/img2img", {**SMALL, "init_images": [png_b64(BOMB)]}, 422,
     "decompression bomb"),
    ("mask not an image", "POST", "/sdapi/v1/img2img", {**SMALL, "init_images": [png_b64(RED)], "mask": NOT_AN_IMAGE},
     422, "mask"),
    ("latent noise fill", "POST", "/sdapi/v1/img2img",
     {**SMALL, "init_images": [png_b64(RED)], "mask": png_b64(RED.convert("L")), "inpainting_fill": 2}, 422,
     "inpainting_fill"),
    ("latent resize mode", "POST", "/sdapi/v1/img2img", {**SMALL, "init_images": [png_b64(RED)], "resize_mode": 3}, 422,
     "resize_mode"),
    ("strength above 1", "POST", "/sdapi/v1/img2img",
     {**SMALL, "init_images": [png_b64(RED)], "denoising_strength": 1.5}, 422, "denoising_strength"),
    ("body above 20 MiB", "POST", "/sdapi/v1/txt2img", b'{"prompt": "' + b"x" * (21 * 1024 * 1024) + b'"}', 413,
     "larger than this server"),
    ("unknown job", "GET", "/v1/jobs/0000", None, 404, "unknown job"),
    ("unknown job image", "GET", "/v1/jobs/0000/images/0", None, 404, "unknown job"),
    ("cancel unknown job", "DELETE", "/v1/jobs/0000", None, 404, "unknown job"),
    ("unknown job kind", "POST", "/v1/jobs", {"kind": "video", "request": {}}, 422, "kind"),
    ("job body field", "POST", "/v1/jobs", {"kind": "txt2img", "reqest": {}}, 422, "reqest"),
    ("job list state", "GET", "/v1/jobs?state=sleeping", None, 422, "state"),
    ("unknown option", "POST", "/sdapi/v1/options", {"sd_vae": "x"}, 422, "sd_vae"),
    ("unknown model option", "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, 422, "nope"),
    ("bad clip skip", "POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 0}, 422, "CLIP_stop_at_last_layers"),
    ("png-info without image", "POST", "/sdapi/v1/png-info", {}, 422, "image"),
]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(client):
    assert len(BAD) >= 25
    for name, method, path, body, status, needle in BAD:
        if isinstance(body, bytes):
            r = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = client.request(method, path, json=body)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert needle in json.dumps(detail), (name, detail)
        assert client.get("/internal/ping").status_code == 200, name
    # and real work still runs
    r = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_txt2img_response_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a red apple", "batch_size": 2, "n_iter": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 4
    assert body["parameters"]["steps"] == 3 and body["parameters"]["cfg_scale"] == 7.0  # A1111's default filled
    assert body["parameters"]["width"] == 64
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8, 9, 10]  # the server's default seed mode: A1111's, image i from seed + i
    assert info["sampler_name"] == "Euler" and info["sd_model_name"] == "emoji" and len(info["sd_model_hash"]) == 10
    assert len(info["infotexts"]) == 4 and "Seed: 9" in info["infotexts"][2]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64) and image.info["parameters"] == info["infotexts"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]})
    assert r.json()["info"] == info["infotexts"][0] and r.json()["parameters"]["Seed"] == "7"


def test_hires_fix(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
                                               "hr_second_pass_steps": 2, "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (128, 128)
    assert "Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Latent" in image.info["parameters"]


def test_send_images_false_and_data_urls(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [png_b64(RED, data_url=True)]})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.75


def test_inpainting_keeps_the_unmasked_pixels(client):
    base = Image.open(io.BytesIO(base64.b64decode(client.post("/sdapi/v1/txt2img", json=SMALL).json()["images"][0])))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (24, 24, 40, 40))
    for full_res in (True, False):
        r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [png_b64(base)], "mask": png_b64(mask),
                                                   "mask_blur": 0, "inpaint_full_res": full_res, "seed": 3})
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert out.getpixel((2, 2)) == base.convert("RGB").getpixel((2, 2))
        diff = sum(abs(a - b) for a, b in zip(out.getpixel((32, 32)), base.convert("RGB").getpixel((32, 32))))
        assert diff > 0, "the masked area was not repainted"
    inverted = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [png_b64(base)], "mask": png_b64(mask),
                                                      "mask_blur": 0, "inpainting_mask_invert": 1, "seed": 3})
    out = Image.open(io.BytesIO(base64.b64decode(inverted.json()["images"][0]))).convert("RGB")
    assert out.getpixel((32, 32)) == base.convert("RGB").getpixel((32, 32))


def test_jobs_api_lists_serves_images_and_cancels_only_that_job(client):
    slow = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "steps": 150}}).json()
    other = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "prompt": "other"}}).json()
    waiting = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "prompt": "waiting"}}).json()
    assert slow["state"] == "pending" and other["position"] >= 1
    deadline = time.monotonic() + 30
    while client.get(f"/v1/jobs/{slow['id']}").json()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get(f"/v1/jobs/{slow['id']}/preview").headers["content-type"] == "image/png"
    client.delete(f"/v1/jobs/{waiting['id']}")  # pending: never starts
    client.delete(f"/v1/jobs/{slow['id']}")  # running: stops at its next step
    assert wait_done(client, slow["id"])["state"] == "canceled"
    done = wait_done(client, other["id"])
    assert done["state"] == "completed" and len(done["images"]) == 1
    assert wait_done(client, waiting["id"])["state"] == "canceled"
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["step"] == 0
    png = client.get(done["images"][0])
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).info["parameters"]
    states = {j["id"]: j["state"] for j in client.get("/v1/jobs").json()}
    assert states[slow["id"]] == "canceled" and states[other["id"]] == "completed"
    assert other["id"] in [j["id"] for j in client.get("/v1/jobs?state=completed").json()]


def test_queue_limit_answers_429_with_retry_after(tmp_path):
    service = make_service(tmp_path, max_queue=2)
    try:
        with TestClient(create_app(service)) as c:
            body = {"kind": "txt2img", "request": {**SMALL, "steps": 100}}
            ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            for i in ids:
                c.delete(f"/v1/jobs/{i}")
    finally:
        service.stop()


def test_auth_guards_every_route(tmp_path):
    service = make_service(tmp_path, auth=(("alice", "s3cret"), ("bob", "pw")))
    try:
        with TestClient(create_app(service)) as c:
            for path in ("/", "/static/app.js", "/sdapi/v1/progress", "/sdapi/v1/sd-models", "/v1/jobs", "/internal/ping",
                         "/docs", "/openapi.json"):
                r = c.get(path)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic", path
                assert c.get(path, auth=("alice", "wrong")).status_code == 401, path
                assert c.get(path, auth=("alice", "s3cret")).status_code == 200, path
            assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 401
            assert c.post("/sdapi/v1/txt2img", json=SMALL, auth=("bob", "pw")).status_code == 200
    finally:
        service.stop()


def test_store_recovers_running_jobs_once(tmp_path):
    store = Store(tmp_path)
    a = store.add("txt2img", "m", {"body": {}})
    b = store.add("txt2img", "m", {"body": {}})
    assert store.claim().id == a.id
    store.save_image(a.id, 0, b"partial")
    store.close()  # the process "dies" with a running
    store = Store(tmp_path)
    assert store.recover() == [a.id]
    assert store.get(a.id).state == "pending" and not store.image_dir(a.id).exists()
    assert [store.claim().id, store.claim().id] == [a.id, b.id]
    assert store.complete(a.id, 0, "{}") and not store.complete(a.id, 0, "{}")  # completes once
    assert store.get(a.id).completions == 1 and store.get(a.id).attempts == 2


def test_a1111_plan_maps_fields():
    req = a1111.parse("txt2img", {"prompt": "x", "sampler_name": "DPM++ 2M Karras", "steps": 9, "batch_size": 2,
                                  "n_iter": 3, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    plan = a1111.plan(req, native=64, downscale=8, options={"CLIP_stop_at_last_layers": 1}, limits=a1111.Limits(),
                      seed=10, subseed=0)
    assert [r.seed for r in plan.runs] == [10, 12, 14]
    r = plan.runs[0]
    assert (r.sampler, r.scheduler, r.clip_skip, r.width, r.steps) == ("dpmpp_2m", "karras", 2, 64, 9)
    webuiapi_defaults = {"eta": 1.0, "s_noise": 1, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "seed_resize_from_h": 0,
                         "seed_resize_from_w": 0, "styles": [], "hr_upscaler": "Latent", "denoising_strength": 0.7,
                         "sampler_name": "Euler a", "scheduler": "automatic", "override_settings": {}}
    plan = a1111.plan(a1111.parse("txt2img", webuiapi_defaults), native=64, downscale=8, options={},
                      limits=a1111.Limits(), seed=1, subseed=1)
    assert plan.runs[0].sampler == "euler_a" and plan.runs[0].eta == 0.0
    ddim = a1111.plan(a1111.parse("txt2img", {"sampler_name": "DDIM", "eta": 0.5}), native=64, downscale=8, options={},
                      limits=a1111.Limits(), seed=1, subseed=1)
    assert ddim.runs[0].eta == 0.5
    with pytest.raises(RequestError) as e:
        a1111.plan(a1111.parse("txt2img", {"restore_faces": True}), native=64, downscale=8, options={}, limits=a1111.Limits(),
                   seed=1, subseed=1)
    assert e.value.field == "restore_faces"


def test_styles_apply_by_name(tmp_path):
    csv = tmp_path / "styles.csv"
    csv.write_text('name,prompt,negative_prompt\nframed,"a photo of {prompt}",blurry\n')
    service = make_service(tmp_path / "data", styles_file=str(csv))
    try:
        with TestClient(create_app(service)) as c:
            assert c.get("/sdapi/v1/prompt-styles").json() == [{"name": "framed", "prompt": "a photo of {prompt}",
                                                                "negative_prompt": "blurry"}]
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat", "styles": ["framed"]})
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["info"])["infotexts"][0].startswith("a photo of a cat\nNegative prompt: blurry\n")
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["nope"]})
            assert r.status_code == 422 and "nope" in r.json()["detail"]
    finally:
        service.stop()


def test_models_dir_lists_and_switches_by_name_only(tmp_path):
    import shutil

    from sdtorch.generate.loading import BUILTIN

    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    shutil.copy(BUILTIN, models / "other.safetensors")
    shutil.copy("tests/data/golden/starry.safetensors", models / "Lora" / "starry.safetensors")
    service = make_service(tmp_path / "data", models_dir=str(models))
    try:
        with TestClient(create_app(service)) as c:
            listed = c.get("/sdapi/v1/sd-models").json()
            assert [m["model_name"] for m in listed] == ["emoji", "other"]
            assert [lo["name"] for lo in c.get("/sdapi/v1/loras").json()] == ["starry"]
            for bad in ("../models/other.safetensors", str(models / "other.safetensors"), "/etc/passwd", "starry"):
                r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
                assert r.status_code == 422 and "unknown model" in r.json()["detail"], bad
            assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
            assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == listed[1]["title"]
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a red apple <lora:starry:0.8>"})
            assert r.status_code == 200, r.text
            info = json.loads(r.json()["info"])
            assert info["sd_model_name"] == "other" and "Model: other" in info["infotexts"][0]
            plain = client_image(c, {**SMALL, "prompt": "a red apple"})
            assert plain != r.json()["images"][0], "the LoRA tag changed nothing"
    finally:
        service.stop()


def client_image(c, body: dict) -> str:
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def test_a_failing_job_is_marked_failed_and_the_next_one_runs(client, service, monkeypatch):
    pipe = service.models.loaded[1]
    real = pipe.run

    def run(request, **kw):
        if request.prompt == "boom":
            raise RuntimeError("out of memory (simulated)")
        return real(request, **kw)

    monkeypatch.setattr(pipe, "run", run)
    bad = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "prompt": "boom"}}).json()
    good = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "prompt": "fine"}}).json()
    failed = wait_done(client, bad["id"])
    assert failed["state"] == "failed" and "out of memory (simulated)" in failed["error"]
    assert wait_done(client, good["id"])["state"] == "completed"
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "boom"})
    assert r.status_code == 500 and "out of memory" in r.json()["detail"]


def test_events_stream_steps_and_previews(client):
    seen, deadline = [], time.monotonic() + 60
    with client.stream("GET", "/v1/events") as stream:
        job = client.post("/v1/jobs", json={"kind": "txt2img", "request": {**SMALL, "steps": 4}}).json()
        for line in stream.iter_lines():
            assert time.monotonic() < deadline, seen
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["id"] == job["id"]:
                    seen.append(event)
                    if event["state"] in ("completed", "failed", "canceled"):
                        break
    steps = [e["step"] for e in seen if e["state"] == "running" and e["step"]]
    assert seen[-1]["state"] == "completed"
    assert steps == [1, 2, 3, 4], seen
    previews = [e for e in seen if "preview" in e]
    assert previews and previews[0]["preview"].startswith("data:image/png;base64,")


def test_token_merging_ratio(client):
    body = {**SMALL, "prompt": "a red apple", "token_merging_ratio": 0.5}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Token merging ratio: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
    for bad in ({"token_merging_ratio": 1.2}, {"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3}):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "x", **bad})
        assert r.status_code == 422 and "token_merging_ratio" in r.text
