"""`sdtorch serve` as a real process on 127.0.0.1 with the built-in model: the unmodified
`webuiapi` client, 8 concurrent clients, SIGKILL and SIGTERM with jobs running and waiting,
and basic auth. Every wait is bounded; all traffic is loopback."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_util import get_json, post_json, request, serve_args, start, stop, wait_for

webuiapi = pytest.importorskip("webuiapi")

from sdtorch.cli import main as cli  # noqa: E402
from sdtorch.generate import GenerationRequest, load  # noqa: E402


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("live")
    p = start(serve_args(data, "--preview-every", "1"))
    yield p.url, data
    assert stop(p.proc) == 0, p.text


@pytest.fixture(scope="module")
def builtin():
    return load()


def finished(url: str, job_id: str):
    job = get_json(f"{url}/v1/jobs/{job_id}")
    return job if job["state"] in ("completed", "failed", "canceled") else None


def test_webuiapi_client_works_unchanged(live, tmp_path):
    url, _ = live
    api = webuiapi.WebUIApi(*host_port(url))  # GETs /sdapi/v1/scripts
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["emoji"] and models[0]["title"] == f"emoji.safetensors [{models[0]['hash']}]"
    api.util_set_model("emoji")
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    api.util_wait_for_ready(check_interval=0.1)
    assert {s["name"] for s in api.get_samplers()} >= {"Euler a", "Euler", "DPM++ 2M", "DDIM"}
    assert "karras" in [s["name"] for s in api.get_schedulers()]

    r = api.txt2img(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=6, sampler_name="Euler",
                    width=64, height=64, cfg_scale=6)
    assert cli(["generate", "a red apple", "--negative", "blurry", "--seed", "1234", "--steps", "6", "--sampler", "euler",
                "--scheduler", "automatic", "--cfg", "6", "--out", str(tmp_path)]) == 0
    from_cli = Image.open(next(tmp_path.glob("*.png")))
    assert np.array_equal(pixels(r.image), pixels(from_cli)), "the API and the CLI disagree"
    assert r.info["infotexts"][0] == from_cli.info["parameters"]
    assert r.info["seed"] == 1234 and r.parameters["steps"] == 6

    assert api.png_info(r.image).info == from_cli.info["parameters"]
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(images=[r.image], mask_image=mask, prompt="a green apple", seed=5, steps=6, width=64,
                            height=64, denoising_strength=0.9, mask_blur=0)
    assert pixels(inpainted.image)[2, 2].tolist() == pixels(r.image)[2, 2].tolist()
    assert np.abs(pixels(inpainted.image)[24:40, 24:40] - pixels(r.image)[24:40, 24:40]).mean() > 1
    plain = api.img2img(images=[r.image], prompt="a green apple", seed=5, steps=6, width=64, height=64)
    assert plain.image.size == (64, 64) and "Denoising strength: 0.75" in plain.info["infotexts"][0]

    up = api.extra_single_image(image=r.image, upscaler_1="Lanczos", upscaling_resize=2)
    assert up.image.size == (128, 128) and up.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    assert np.array_equal(pixels(up.image), pixels(r.image.resize((128, 128), Image.LANCZOS)))
    assert up.image.info["parameters"] == r.info["infotexts"][0]
    batch = api.extra_batch_images(images=[r.image, plain.image], upscaler_1="Nearest", resize_mode=1,
                                   upscaling_resize_w=96, upscaling_resize_h=96)
    assert [im.size for im in batch.images] == [(96, 96), (96, 96)]


def run_in_thread(fn):
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001
            out["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def test_progress_interrupt_and_skip(live):
    url, _ = live
    api = webuiapi.WebUIApi(*host_port(url))
    thread, out = run_in_thread(lambda: api.txt2img(prompt="a star", seed=3, steps=150, width=128, height=128))
    progress = wait_for(lambda: (lambda p: p if p["progress"] > 0.05 and p["current_image"] else None)(api.get_progress()),
                        60, "progress with a live preview")
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] >= 1
    assert progress["eta_relative"] > 0
    assert api.get_progress()["state"]["sampling_step"] >= 1
    api.interrupt()
    t0 = time.monotonic()
    thread.join(30)
    assert time.monotonic() - t0 < 10 and "result" in out, out
    assert out["result"].image.size == (128, 128)  # the state it had reached
    # skip: the running batch stops, the next one runs
    thread, out = run_in_thread(lambda: api.txt2img(prompt="a moon", seed=4, steps=120, width=128, height=128, n_iter=2))
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 3, 60, "the first batch to run")
    assert api.get_progress()["state"]["job_no"] == 0
    api.skip()
    wait_for(lambda: api.get_progress()["state"]["job_no"] == 1, 30, "the second batch")
    api.interrupt()
    thread.join(30)
    assert "result" in out, out
    assert len(out["result"].images) == 2
    api.util_wait_for_ready(check_interval=0.1)


def test_eight_clients_forty_jobs_each_once_with_its_own_image(live, builtin):
    url, data = live
    results: dict[int, str] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for j in range(5):
            seed = 100 + 5 * c + j
            job = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {
                "prompt": f"emoji number {seed % 7}", "seed": seed, "steps": 4, "sampler_name": "Euler"}})
            with lock:
                results[seed] = job["id"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40 and len(set(results.values())) == 40
    for seed, job_id in results.items():
        job = wait_for(lambda: finished(url, job_id), 120, f"job {job_id}")
        assert job["state"] == "completed" and len(job["images"]) == 1
        status, png = request("GET", url + job["images"][0])
        assert status == 200
        import io

        got = Image.open(io.BytesIO(png))
        alone = builtin.run(GenerationRequest(f"emoji number {seed % 7}", seed=seed, steps=4, sampler="euler",
                                              scheduler="automatic", cfg_scale=7.0)).images[0]
        assert np.array_equal(pixels(got), pixels(alone)), f"job with seed {seed} differs from the same job alone"
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        rows = db.execute(f"SELECT completions, attempts FROM jobs WHERE id IN ({','.join('?' * 40)})",
                          list(results.values())).fetchall()
    assert rows == [(1, 1)] * 40


def counts(data) -> dict[str, tuple]:
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, completions, attempts FROM jobs")}


def test_sigkill_and_sigterm_lose_nothing_and_run_nothing_twice(tmp_path, builtin):
    data = tmp_path / "data"
    port_args = serve_args(data, "--preview-every", "0")
    first = start(port_args)
    url = first.url
    done = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {"prompt": "a cat", "seed": 1, "steps": 3}})
    wait_for(lambda: finished(url, done["id"]), 60, "the first job")
    slow_request = {"prompt": "a slow heart", "seed": 2, "steps": 60, "sampler_name": "Euler"}
    slow = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": slow_request})
    waiting = [post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {"prompt": "a dog", "seed": s, "steps": 3}})
               for s in (3, 4, 5)]
    wait_for(lambda: get_json(f"{url}/v1/jobs/{slow['id']}")["step"] >= 2, 60, "the slow job to run")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    second = start(port_args)
    url = second.url
    assert "will run again" in second.text
    for job in (slow, *waiting):
        assert wait_for(lambda: finished(url, job["id"]), 120, job["id"])["state"] == "completed"
    state = counts(data)
    assert all(c == ("completed", 1, 1) for i, c in state.items() if i != slow["id"]), state
    assert state[slow["id"]] == ("completed", 1, 2)  # run again from scratch, completed once
    status, png = request("GET", f"{url}/v1/jobs/{done['id']}/images/0")  # finished before the crash
    assert status == 200 and png[:4] == b"\x89PNG"
    import io

    status, png = request("GET", f"{url}/v1/jobs/{slow['id']}/images/0")
    alone = builtin.run(GenerationRequest("a slow heart", seed=2, steps=60, sampler="euler", scheduler="automatic",
                                          cfg_scale=7.0)).images[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(png))), pixels(alone))

    # SIGTERM: the running step finishes, the job goes back to the queue, exit status 0
    again = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {**slow_request, "seed": 9}})
    wait_for(lambda: get_json(f"{url}/v1/jobs/{again['id']}")["step"] >= 2, 60, "the job to run")
    assert stop(second.proc, signal.SIGTERM) == 0, second.text
    assert counts(data)[again["id"]][0] == "pending"
    third = start(port_args)
    try:
        assert wait_for(lambda: finished(third.url, again["id"]), 120, "the requeued job")["state"] == "completed"
        assert counts(data)[again["id"]] == ("completed", 1, 2)
    finally:
        assert stop(third.proc) == 0, third.text


def test_basic_auth_with_webuiapi(tmp_path):
    p = start(serve_args(tmp_path, "--api-auth", "alice:s3cret,bob:pw"))
    try:
        host, port = host_port(p.url)
        status, body = request("GET", p.url + "/sdapi/v1/progress")
        assert status == 401 and "credentials" in body["detail"]
        status, _ = request("GET", p.url + "/")
        assert status == 401
        api = webuiapi.WebUIApi(host, port, username="bob", password="pw")
        r = api.txt2img(prompt="a sun", seed=1, steps=3, width=64, height=64)
        assert r.image.size == (64, 64)
        with pytest.raises(RuntimeError):
            webuiapi.WebUIApi(host, port).txt2img(prompt="a sun", steps=3)
    finally:
        assert stop(p.proc) == 0, p.text
