"""The worker: one thread that takes jobs from the store in order and runs them on the loaded
model, publishing progress (and live previews) as it goes.

Each job runs as its A1111 plan: n_iter GenerationRequests, each one `Pipeline.run`. Cancel
(DELETE /v1/jobs/{id}) stops only that job at its next step; A1111's interrupt stops it there
and keeps the images of its current state, skip does that to the current batch and goes on
with the next. A job that raises (bad input found late, out of memory) is marked failed with its
error and the next one runs. On shutdown the running job stops at its next step and goes back
to the queue, to run from scratch on the next start.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

from sdtorch.families import concat_kind
from sdtorch.generate import Cancelled, CancelToken, png_bytes
from sdtorch.generate.hires import model_upscale, total_steps
from sdtorch.sampling.noise import image_seeds
from sdtorch.serve import a1111, extras
from sdtorch.serve.images import decode_image
from sdtorch.serve.models import Models
from sdtorch.serve.preview import make_previewer
from sdtorch.serve.store import Job, Store

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The running job, as /sdapi/v1/progress and /v1/jobs report it."""

    job: str | None = None
    kind: str = ""
    started: float = 0.0
    step: int = 0  # steps done over all batches of the job
    steps: int = 0
    batch: int = 0  # A1111's job_no: the batch now running
    batches: int = 0
    batch_step: int = 0
    batch_steps: int = 0
    preview: bytes | None = None
    preview_step: int = 0
    interrupted: bool = False
    skipped: bool = False
    timestamp: str = ""
    token: CancelToken = field(default_factory=CancelToken)

    @property
    def eta_s(self) -> float | None:
        if self.step == 0:
            return None
        return (time.monotonic() - self.started) / self.step * (self.steps - self.step)

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 0.0


class Worker:
    def __init__(self, store: Store, models: Models, options: dict, limits: a1111.Limits, *,
                 preview_every: int = 2, preview_mode: str = "cheap",
                 publish: Callable[[dict], None] = lambda event: None):
        self.store, self.models, self.options, self.limits = store, models, options, limits
        self.preview_every, self.preview_mode = preview_every, preview_mode
        self.publish = publish
        self.styles: dict = {}  # A1111 styles by name (--styles-file)
        self.seed_mode = "a1111"  # --seed-mode
        self.progress = Progress()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdtorch-worker", daemon=True)
        self._previewers: dict[int, Callable] = {}
        self.on_finish: Callable[[str], None] = lambda job_id: None  # called with every finished job id
        # Cluster workers read cancel / interrupt / skip from the shared store at every step
        # (`RedisStore.controls`); the local worker is told directly by the routes.
        self.poll_controls = False

    def start(self) -> None:
        """Run the loop in a thread of its own (tests, notebooks). `sdtorch serve` runs it in the
        main thread instead (`run`): on a small CPU, PyTorch computing in a second thread while
        the main thread's OpenMP pool exists ran at half speed."""
        self._thread.start()

    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """The loop in the calling thread, until `request_stop` or until `alive()` is false."""
        self._loop(alive)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def dispatch(self, job: Job) -> None:
        """A job was queued: wake the loop (a cluster's dispatcher sends it to a worker instead)."""
        self.notify()

    def progress_of(self, job_id: str) -> Progress | None:
        return self.progress if self.progress.job == job_id else None

    def geometry(self, title: str) -> tuple[int, int] | None:
        """(native size, VAE downscale) of a model, when known without loading it (here: never)."""
        return None

    def request_stop(self) -> None:
        """Stop after the running step (the running job goes back to the queue); returns at once."""
        self._stopping.set()
        self.progress.token.cancel()
        self.notify()

    def stop(self, timeout: float = 120.0) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -------------------------------------------------------------------------- control

    def cancel(self, job_id: str) -> None:
        if self.progress.job == job_id:
            self.progress.token.cancel()

    def interrupt(self) -> None:
        p = self.progress
        if p.job is not None:
            p.interrupted = True
            p.token.interrupt()

    def skip(self) -> None:
        p = self.progress
        if p.job is not None:
            p.skipped = True
            p.token.interrupt()

    # -------------------------------------------------------------------------- the loop

    def _loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        while not self._stopping.is_set() and alive():
            job = self.store.claim()
            if job is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        self._event(job.id, "running", 0, 0)
        try:
            state, count = self._execute(job)
        except Cancelled:
            state, count = None, 0
        except Exception as e:  # noqa: BLE001  a failing job must not stop the server
            log.error("job %s failed: %s", job.id, traceback.format_exc())
            self.store.fail(job.id, f"{type(e).__name__}: {e}")
            state, count = "failed", 0
        finally:
            steps = self.progress.steps
            self.progress = Progress()
        if state is None:  # cancelled by its owner, or stopped by a shutdown
            if self._stopping.is_set() and not self.store.get(job.id).cancel:
                self.store.requeue(job.id)
                state = "pending"
            else:
                self.store.canceled(job.id)
                state = "canceled"
        self._event(job.id, state, steps if state == "completed" else 0, steps, images=count)
        self.on_finish(job.id)

    def _execute(self, job: Job) -> tuple[str, int]:
        if job.kind in extras.KINDS:
            return self._extras(job)
        pipe = self.models.get(job.model)
        req = a1111.parse(job.kind, job.request["body"])
        plan = a1111.plan(req, native=pipe.config.sample_size, downscale=pipe.vae.downscale,
                          options=job.request["options"], limits=self.limits, seed=job.request["seed"],
                          subseed=job.request["subseed"], styles=self.styles, seed_mode=self.seed_mode,
                          controlnet=lambda name: self.models.controlnets.load(name, pipe),
                          upscaler=lambda name: self.models.companion(self.models.find_upscaler(name).title, "upscaler"))
        runs = plan.runs
        if req.refiner_checkpoint and req.refiner_switch_at != 1:  # A1111: the refiner takes over within each run
            refiner = self.models.companion(req.refiner_checkpoint)
            runs = [replace(r, refiner=refiner) for r in runs]
        per_run = total_steps(runs[0])
        p = self.progress
        p.job, p.kind, p.started = job.id, job.kind, time.monotonic()
        p.steps, p.batches, p.batch_steps = per_run * len(runs), len(runs), per_run
        p.timestamp = time.strftime("%Y%m%d%H%M%S")
        if self.store.get(job.id).cancel:
            raise Cancelled("canceled before it started")
        images, infotexts, seeds = [], [], []
        for n, request in enumerate(runs):
            p.batch, p.batch_step = n, 0
            if p.token.keep:  # skipped: a fresh token for the next batch; interrupted: stop here
                if p.interrupted:
                    break
                p.token, p.skipped = CancelToken(), False
            result = pipe.run(request, on_step=self._on_step(job, pipe, n * per_run), cancel=p.token)
            for im, seed in zip(result.images, result.seeds):
                im = plan.finish(im)
                png = png_bytes(im)
                self.store.save_image(job.id, len(images), png)
                images.append(png)
                infotexts.append(im.info.get("parameters", ""))
                seeds.append(seed)
        for im in plan.maps if len(images) else ():  # the extension's detected maps, after the images
            png = png_bytes(im)
            self.store.save_image(job.id, len(images), png)
            images.append(png)
        info = _info(job, req, plan, pipe, self.models, runs, infotexts, seeds, p.timestamp)
        if not self.store.complete(job.id, len(images), json.dumps(info)):
            raise Cancelled("the job was no longer running")
        return "completed", len(images)

    def _extras(self, job: Job) -> tuple[str, int]:
        """A1111's Extras upscaling (`sdtorch.serve.extras`) of each image of the request."""
        req = extras.parse(job.kind, job.request["body"])
        p = self.progress
        p.job, p.kind, p.started = job.id, job.kind, time.monotonic()
        token = p.token
        models = {}
        for name in extras.used(req):
            if name not in extras.BUILT_IN:
                pipe = self.models.companion(self.models.find_upscaler(name).title, "upscaler")
                models[name] = lambda image, pipe=pipe: model_upscale(pipe, image, cancel=token)
        infos = []
        for n, source in enumerate(extras.inputs(req, decode_image)):
            out, info = extras.process(source, req, models)
            self.store.save_image(job.id, n, png_bytes(extras.finish(out, source, info)))
            infos.append(info)
        info = {"html_info": extras.html_info(infos), "postprocessing": [extras.infotext(i) for i in infos]}
        if not self.store.complete(job.id, len(infos), json.dumps(info)):
            raise Cancelled("the job was no longer running")
        return "completed", len(infos)

    def _on_step(self, job: Job, pipe, offset: int):
        p = self.progress

        def on_step(step: int, total: int, latents) -> None:
            p.batch_step, p.step = step, offset + step
            if self.poll_controls:
                self._poll(job.id)
            preview = None
            if self.preview_every and (step % self.preview_every == 0 or step == total):
                preview = self._preview(pipe, latents)
                p.preview, p.preview_step = preview, p.step
            self._event(job.id, "running", p.step, p.steps, preview=preview)

        return on_step

    def _poll(self, job_id: str) -> None:
        cancel, signal = self.store.controls(job_id)
        if cancel:
            self.progress.token.cancel()
        elif signal == "interrupt":
            self.interrupt()
        elif signal == "skip":
            self.skip()

    def _preview(self, pipe, latents) -> bytes:
        key = id(pipe)
        if key not in self._previewers:
            self._previewers = {key: make_previewer(pipe, self.preview_mode)}
        image = self._previewers[key](latents)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    def _event(self, job_id: str, state: str, step: int, steps: int, *, preview: bytes | None = None,
               images: int | None = None) -> None:
        p = self.progress
        event = {"id": job_id, "state": state, "step": step, "steps": steps,
                 "eta_s": p.eta_s if state == "running" else None}
        if state == "running":  # what a cluster's API node rebuilds its progress from
            event |= {"batch": p.batch, "batches": p.batches, "batch_step": p.batch_step,
                      "batch_steps": p.batch_steps, "interrupted": p.interrupted, "skipped": p.skipped,
                      "timestamp": p.timestamp}
        if preview is not None:
            import base64

            event["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
        if images is not None:
            event["images"] = images
        self.publish(event)


def _info(job: Job, req, plan: a1111.Plan, pipe, models: Models, runs, infotexts: list[str], seeds: list[int],
          timestamp: str) -> dict:
    """A1111's `info` JSON of a finished job (Processed.js())."""
    first = runs[0]
    n = len(infotexts)
    entry = models.find(job.model)
    from sdtorch.sampling import samplers

    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
        "seed": seeds[0] if seeds else first.seed, "all_seeds": seeds,
        "subseed": first.subseed, "all_subseeds": _subseeds(runs, first.seed_mode),
        "subseed_strength": req.subseed_strength,
        "width": first.width, "height": first.height,
        "sampler_name": samplers.display_name(first.sampler, "automatic"),
        "cfg_scale": first.cfg_scale, "steps": first.steps, "batch_size": first.batch_size,
        "restore_faces": bool(req.restore_faces), "face_restoration_model": None,
        "sd_model_name": entry.model_name, "sd_model_hash": entry.shorthash or None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": getattr(req, "denoising_strength", None) if job.kind == "img2img" else None,
        "extra_generation_params": {"Schedule type": first.scheduler} if first.scheduler != "automatic" else {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": req.styles or [],
        "job_timestamp": timestamp, "clip_skip": first.clip_skip or 1,
        "is_using_inpainting_conditioning": concat_kind(pipe.config) == "inpainting",
        "version": _version(),
    }


def _subseeds(runs, mode: str) -> list[int]:
    return [s for r in runs for s in image_seeds(r.subseed, r.batch_size, mode)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sdtorch {version('sdtorch')}"
    except PackageNotFoundError:
        return "sdtorch"
