"""A stand-in for `sdtorch serve` with the routes the web page uses and no model: jobs "run" by
sleeping per step and painting coloured PNGs. Test-only (tests/test_serve_browser.py drives the
page against it, fast and without torch). Run: python tests/serve_mock.py --port N

It records every job request it accepted (GET /mock/requests) so tests can check what the page sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

STATIC = Path(__file__).resolve().parent.parent / "sdtorch" / "serve" / "static"
SAMPLERS = ["DPM++ 2M", "Euler a", "Euler", "DDIM"]
MODELS = ["emoji [0123456789]", "other [abcdef0123]"]


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    for i in range(size):  # a diagonal stripe, so that the picture is not flat
        image.putpixel((i, i), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Mock:
    def __init__(self, step_s: float):
        self.step_s = step_s
        self.jobs: dict[str, dict] = {}
        self.order: list[str] = []
        self.requests: list[dict] = []
        self.options = {"sd_model_checkpoint": MODELS[0]}
        self.lock = threading.Lock()
        self.events: list[dict] = []  # every event, in order (SSE clients read from an index)
        self.wake = threading.Condition(self.lock)
        threading.Thread(target=self.worker, daemon=True).start()

    def public(self, job: dict) -> dict:
        keys = ("id", "kind", "state", "step", "steps", "progress", "eta_s", "error", "info", "request")
        out = {k: job[k] for k in keys}
        out["position"] = self.position(job["id"])
        out["images"] = [f"/v1/jobs/{job['id']}/images/{n}" for n in range(len(job["pngs"]))]
        return out

    def position(self, job_id: str) -> int:
        pending = [i for i in self.order if self.jobs[i]["state"] == "pending"]
        return pending.index(job_id) + 1 if job_id in pending else 0

    def emit(self, job: dict, preview: bool) -> None:
        event = {"id": job["id"], "step": job["step"], "steps": job["steps"], "eta_s": job["eta_s"], "state": job["state"]}
        if preview and job["preview"] is not None:
            event["preview"] = "data:image/png;base64," + base64.b64encode(job["preview"]).decode()
        self.events.append(event)
        self.wake.notify_all()

    def worker(self) -> None:
        while True:
            with self.lock:
                job = next((self.jobs[i] for i in self.order if self.jobs[i]["state"] == "pending"), None)
                if job is None:
                    self.wake.wait(0.2)
                    continue
                job["state"] = "running"
                self.emit(job, False)
            for step in range(1, job["steps"] + 1):
                time.sleep(self.step_s)
                with self.lock:
                    if job["cancel"]:
                        job["state"] = "canceled"
                        self.emit(job, False)
                        break
                    job["step"], job["progress"] = step, step / job["steps"]
                    job["eta_s"] = (job["steps"] - step) * self.step_s
                    job["preview"] = png((20 * step % 256, 90, 255 - 20 * step % 256), 16)
                    self.emit(job, True)
            with self.lock:
                if job["state"] == "running":
                    req = job["request"]
                    seeds = [int(req.get("seed", -1)) % 1000 + k for k in range(int(req.get("batch_size", 1)))]
                    job["pngs"] = [png((200, 60 + 40 * k, 40)) for k in range(len(seeds))]
                    job["info"] = json.dumps({
                        "prompt": req.get("prompt", ""), "negative_prompt": req.get("negative_prompt", ""),
                        "seed": seeds[0], "all_seeds": seeds, "steps": job["steps"], "cfg_scale": req.get("cfg_scale", 7),
                        "sampler_name": req.get("sampler_name", "Euler"), "width": 64, "height": 64,
                        "sd_model_name": self.options["sd_model_checkpoint"].split(" ")[0],
                        "infotexts": [f"{req.get('prompt', '')}\nSteps: {job['steps']}, Seed: {s}" for s in seeds]})
                    job["state"] = "completed"
                    self.emit(job, False)


def make_app(step_s: float = 0.15) -> FastAPI:
    app = FastAPI()
    mock = Mock(step_s)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": n, "aliases": [n.lower()], "options": {}} for n in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": n, "label": n.title(), "aliases": None} for n in ("automatic", "karras", "exponential")]

    @app.get("/sdapi/v1/sd-models")
    def models():
        return [{"title": t, "model_name": t.split(" ")[0], "hash": t[-11:-1], "sha256": None, "filename": f"/m/{t[:5]}"}
                for t in MODELS]

    @app.get("/sdapi/v1/options")
    def get_options():
        return mock.options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await request.json()
        if body.get("sd_model_checkpoint") not in MODELS:
            raise HTTPException(422, "sd_model_checkpoint: unknown model")
        mock.options.update(body)
        return None

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request):
        body = await request.json()
        req = body.get("request", {})
        if body.get("kind") not in ("txt2img", "img2img"):
            raise HTTPException(422, "kind must be txt2img or img2img")
        if not isinstance(req.get("steps", 20), int) or not 1 <= req.get("steps", 20) <= 150:
            raise HTTPException(422, "steps: must be 1..150")
        job_id = str(uuid.uuid4())
        with mock.lock:
            mock.requests.append(body)
            mock.jobs[job_id] = {"id": job_id, "kind": body["kind"], "state": "pending", "step": 0, "steps": req.get("steps", 20),
                                 "progress": 0.0, "eta_s": None, "error": None, "info": None, "request": req,
                                 "pngs": [], "preview": None, "cancel": False}
            mock.order.append(job_id)
            mock.wake.notify_all()
            return {"id": job_id, "state": "pending", "position": mock.position(job_id)}

    @app.get("/v1/jobs")
    def list_jobs(state: str | None = None):
        with mock.lock:
            return [mock.public(mock.jobs[i]) for i in mock.order if state is None or mock.jobs[i]["state"] == state]

    def get(job_id: str) -> dict:
        if job_id not in mock.jobs:
            raise HTTPException(404, f"unknown job {job_id}")
        return mock.jobs[job_id]

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        with mock.lock:
            return mock.public(get(job_id))

    @app.get("/v1/jobs/{job_id}/preview")
    def preview(job_id: str):
        job = get(job_id)
        if job["preview"] is None:
            raise HTTPException(404, "no preview yet")
        return Response(job["preview"], media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}/images/{n}")
    def image(job_id: str, n: int):
        job = get(job_id)
        if not 0 <= n < len(job["pngs"]):
            raise HTTPException(404, "no such image")
        return Response(job["pngs"][n], media_type="image/png")

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        with mock.lock:
            job = get(job_id)
            if job["state"] == "pending":
                job["state"] = "canceled"
                mock.emit(job, False)
            elif job["state"] == "running":
                job["cancel"] = True
            return mock.public(job)

    @app.get("/v1/events")
    async def events(request: Request):
        async def stream():
            index = len(mock.events)
            while not await request.is_disconnected():
                batch = mock.events[index:]
                index += len(batch)
                for e in batch:
                    yield f"data: {json.dumps(e)}\n\n"
                await asyncio.sleep(0.05)
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/mock/requests")
    def requests():
        return JSONResponse(mock.requests)

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--step-s", type=float, default=0.15)
    args = ap.parse_args()
    app = make_app(args.step_s)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started:
            time.sleep(0.02)
        print(f"sdtorch serving on http://127.0.0.1:{args.port}", flush=True)  # the real server's ready line

    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
