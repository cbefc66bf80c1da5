"""The web page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python API).

Against tests/serve_mock.py (fast, no model): the page's logic — what it sends, the live preview,
the gallery, cancel-only-mine, the queue, img2img with a painted mask. Against the real server
(`python -m sdtorch.serve` on the built-in model): type a prompt, click Generate, see #preview
change at least twice, see the final image in #gallery.

Set SDTORCH_SCREENSHOT=docs/serve.png to also write the README's screenshot of the real page.
All traffic goes to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import os
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from serve_util import HERE, free_port, get_json, post_json, server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    if sync_playwright is None:
        pytest.skip("the playwright package is missing (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


WATCH_PREVIEW = """() => {
  const img = document.getElementById('preview');
  window.__loads = [];
  img.addEventListener('load', () => window.__loads.push([img.src, img.naturalWidth]));
}"""


def open_page(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.evaluate(WATCH_PREVIEW)


def generate(page, prompt: str, steps: int, results_before: int = 0) -> list[list]:
    """Type a prompt, click Generate, wait for a new image in #gallery; the #preview loads seen."""
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.evaluate("window.__loads = []")
    page.click("#generate")
    page.wait_for_function(f"""() => {{
        const imgs = document.querySelectorAll('#gallery img');
        return imgs.length > {results_before} && imgs[0].complete && imgs[0].naturalWidth > 0; }}""", timeout=60_000)
    return page.evaluate("window.__loads")


def check_run(page, loads: list[list], url: str) -> None:
    final = page.get_attribute("#gallery img", "src")
    previews = [src for src, width in loads if width > 0 and not src.endswith(final)]
    assert len(set(previews)) >= 2, f"#preview changed {len(set(previews))} times before the result: {loads}"
    assert page.evaluate("document.getElementById('progress').value") == 1
    assert "done" in page.text_content("#progress-label")
    link = page.get_attribute("#gallery a[download]", "href")
    assert link and final.endswith(link.split("/v1/", 1)[-1])
    with urllib.request.urlopen(url + link if link.startswith("/") else link, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("image/png")
        Image.open(io.BytesIO(r.read())).verify()


# ---------------------------------------------------------------------------------------- mock


@pytest.fixture(scope="module")
def mock_url(browser):
    with server([str(HERE / "serve_mock.py"), "--port", str(free_port()), "--step-s", "0.12"], timeout=30) as url:
        yield url


def test_page_generates_against_mock(page, mock_url):
    open_page(page, mock_url)
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")[:2] == ["DPM++ 2M", "Euler a"]
    page.fill("#negative", "blurry")
    page.fill("#cfg", "5.5")
    page.fill("#seed", "1234")
    loads = generate(page, "a red apple", steps=8)
    check_run(page, loads, mock_url)
    sent = get_json(mock_url + "/mock/requests")[-1]
    assert sent["kind"] == "txt2img"
    assert sent["request"] == {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 8, "cfg_scale": 5.5,
                               "sampler_name": "DPM++ 2M", "seed": 1234, "batch_size": 1}
    caption = page.text_content("#gallery figure")
    assert "a red apple" in caption and "234" in caption  # the prompt and the seed the server reports
    # choosing a model posts it to /sdapi/v1/options
    page.select_option("#model", "other [abcdef0123]")
    page.wait_for_function("document.getElementById('status').textContent.includes('model:')")
    assert get_json(mock_url + "/sdapi/v1/options")["sd_model_checkpoint"] == "other [abcdef0123]"


def test_cancel_cancels_only_this_job_and_queue_lists_jobs(page, mock_url):
    open_page(page, mock_url)
    other = post_json(mock_url + "/v1/jobs", {"kind": "txt2img", "request": {"prompt": "someone else", "steps": 12}})
    page.fill("#prompt", "mine")
    page.fill("#steps", "5")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#queue li.job').length >= 2")
    assert "someone else" in page.text_content("#queue") and "mine" in page.text_content("#queue")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('progress-label').textContent === 'canceled'")
    jobs = {j["request"].get("prompt"): j for j in get_json(mock_url + "/v1/jobs")}
    assert jobs["mine"]["state"] == "canceled"
    deadline = time.monotonic() + 20
    while get_json(f"{mock_url}/v1/jobs/{other['id']}")["state"] != "completed":
        assert time.monotonic() < deadline, "the other client's job did not complete"
        time.sleep(0.1)
    assert page.locator("#gallery img").count() == 0 or "mine" not in page.text_content("#gallery")


def test_img2img_with_painted_mask(page, mock_url, tmp_path):
    open_page(page, mock_url)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(init)
    page.click("#img2img summary")
    page.set_input_files("#init-file", str(init))
    page.wait_for_selector("#mask-canvas", state="visible")
    page.fill("#brush", "8")  # range input; fill sets its value
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    assert box["width"] > 100 and box["height"] > 100, box
    x0, y0 = box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, y0, steps=6)
    page.mouse.up()
    assert "inpainting" in page.text_content("#img2img-state")
    page.fill("#prompt", "paint it")
    page.fill("#steps", "3")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length > 0", timeout=20_000)
    sent = get_json(mock_url + "/mock/requests")[-1]
    assert sent["kind"] == "img2img" and sent["request"]["denoising_strength"] == 0.75
    init_png = Image.open(io.BytesIO(base64.b64decode(sent["request"]["init_images"][0].split(",", 1)[1])))
    assert init_png.size == (64, 64) and init_png.convert("RGB").getpixel((5, 5)) == (30, 120, 200)
    mask = Image.open(io.BytesIO(base64.b64decode(sent["request"]["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((20, 32)) == 255 and mask.getpixel((5, 5)) == 0 and mask.getpixel((50, 10)) == 0


# ---------------------------------------------------------------------------------------- real


def test_real_server_live_preview_and_gallery(page, tmp_path):
    args = ["-m", "sdtorch.serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), "--preview-every", "1"]
    with server(args, timeout=120) as url:
        open_page(page, url)
        loads = generate(page, "a red apple", steps=12)
        check_run(page, loads, url)
        job = get_json(url + "/v1/jobs?state=completed")
        assert len(job if isinstance(job, list) else job["jobs"]) == 1
        shot = os.environ.get("SDTORCH_SCREENSHOT")
        if shot:  # the README's picture: a few more results, then the whole page
            for n, prompt in enumerate(["a smiling cat face", "a yellow star", "a green frog"], start=1):
                generate(page, prompt, steps=20, results_before=n)
            page.fill("#prompt", "a red apple")
            page.screenshot(path=shot, full_page=False)
        page.screenshot(path=str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 10_000
