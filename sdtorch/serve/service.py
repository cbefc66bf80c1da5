"""What the HTTP routes share: the store, the models, the worker, the server's options, and the
event hub that fans progress out to Server-Sent-Events clients and to waiting A1111 calls."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from sdtorch.conditioning.styles import read_styles
from sdtorch.generate import RequestError
from sdtorch.serve import a1111, extras
from sdtorch.serve.images import decode_image
from sdtorch.serve.models import Models, default_lora_dir
from sdtorch.serve.store import FINISHED, Job, Store
from sdtorch.serve.worker import Worker


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class Hub:
    """Events from the worker thread to asyncio subscribers (each a bounded queue; a slow
    client loses events rather than growing the server's memory)."""

    def __init__(self) -> None:
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._lock = threading.Lock()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        with self._lock:
            self._subs.add((asyncio.get_running_loop(), q))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subs = {s for s in self._subs if s[1] is not q}

    def publish(self, event: dict | None) -> None:
        with self._lock:
            subs = list(self._subs)
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(_put, q, event)
            except RuntimeError:  # that loop is closed
                self.unsubscribe(q)


def _put(q: asyncio.Queue, event) -> None:
    if q.full() and event is not None:
        return
    if q.full():
        q.get_nowait()
    q.put_nowait(event)


@dataclass
class Settings:
    data_dir: Path
    checkpoint: str | None = None
    models_dir: str | None = None
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    controlnet_dir: str | None = None
    styles_file: str | None = None
    seed_mode: str = "a1111"  # A1111's per-image seeds; "diffusers": the CLI's default
    max_queue: int = 64
    preview_every: int = 2
    preview: str = "cheap"
    dtype: str = "fp32"
    limits: a1111.Limits = a1111.Limits()
    auth: tuple[tuple[str, str], ...] = ()
    max_body: int = 20 * 1024 * 1024
    queue: str | None = None  # redis://...: a cluster's API node (sdtorch.serve.cluster); None: one machine
    results_dir: str | None = None  # cluster: a shared folder for the images (default: in Redis)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.store = self._store(settings)
        self.recovered = self.store.recover()
        lora_dir = Path(settings.lora_dir) if settings.lora_dir else default_lora_dir(settings.models_dir)
        self.models = Models(settings.checkpoint, settings.models_dir, cache_dir=settings.data_dir, dtype=settings.dtype,
                             lora_dir=lora_dir, embeddings_dir=Path(settings.embeddings_dir) if settings.embeddings_dir else None,
                             controlnet_dir=settings.controlnet_dir)
        self.styles = read_styles(settings.styles_file) if settings.styles_file else {}
        self.options = {"sd_model_checkpoint": self.models.default, "CLIP_stop_at_last_layers": 1}
        self.hub = Hub()
        if settings.queue:  # the jobs run on `sdtorch worker`s: route, relay, re-queue
            from sdtorch.serve.cluster import Dispatcher

            self.worker = Dispatcher(self.store, settings.queue, self.hub.publish)
        else:
            self.worker = Worker(self.store, self.models, self.options, settings.limits,
                                 preview_every=settings.preview_every, preview_mode=settings.preview,
                                 publish=self.hub.publish)
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._wlock = threading.Lock()
        self.worker.on_finish = self._finished
        self.worker.styles, self.worker.seed_mode = self.styles, settings.seed_mode

    @staticmethod
    def _store(settings: Settings):
        if settings.queue:
            from sdtorch.serve.redis_store import RedisStore

            return RedisStore(settings.queue, results=settings.results_dir)
        return Store(settings.data_dir)

    @property
    def clustered(self) -> bool:
        return self.settings.queue is not None

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.hub.publish(None)  # ends the event streams

    # ------------------------------------------------------------------------ submitting

    def submit(self, kind: str, req: a1111._Common) -> Job:
        """Validate an A1111 request against the model it will run on and queue it."""
        over = req.override_settings or {}
        try:
            model = self.models.find(over.get("sd_model_checkpoint", self.options["sd_model_checkpoint"])).title
        except KeyError as e:
            raise RequestError("sd_model_checkpoint", f"sd_model_checkpoint: {e.args[0]}") from None
        if req.refiner_checkpoint:
            try:
                self.models.find(req.refiner_checkpoint)
            except KeyError as e:
                raise RequestError("refiner_checkpoint", f"refiner_checkpoint: {e.args[0]}") from None
        native, downscale = self._geometry(model)
        seed, subseed = a1111.resolve_seeds(req)
        options = dict(self.options)
        a1111.plan(req, native=native, downscale=downscale, options=options, limits=self.settings.limits,
                   seed=seed, subseed=subseed, lora_exists=self._lora_exists, styles=self.styles,
                   seed_mode=self.settings.seed_mode, controlnet=lambda name: self.models.controlnets.find(name).title,
                   upscaler=lambda name: self.models.find_upscaler(name).title)
        record = {"body": req.model_dump(exclude_unset=True), "seed": seed, "subseed": subseed, "options": options}
        return self._queue(kind, model, record)

    def submit_extras(self, kind: str, req: extras._Extras) -> Job:
        """Validate an Extras request (upscaler names, images, output size) and queue it."""
        extras.check(req, self.models.find_upscaler)
        extras.check_size(req, extras.inputs(req, decode_image))
        model = next((self.models.find_upscaler(n).title for n in extras.used(req) if n not in extras.BUILT_IN), "")
        return self._queue(kind, model, {"body": req.model_dump(exclude_unset=True)})

    def _queue(self, kind: str, model: str, record: dict) -> Job:
        job = self.store.add(kind, model, record, max_queue=self.settings.max_queue)
        if job is None:
            raise QueueFull(self.retry_after())
        self.worker.dispatch(job)
        return job

    def parameters(self, job: Job) -> dict:
        """A1111's `parameters`: the request with its defaults (and the native size) filled."""
        req = a1111.parse(job.kind, job.request["body"])
        native, _ = self._geometry(job.model)
        return {**req.model_dump(), "width": req.width or native, "height": req.height or native}

    def _geometry(self, title: str) -> tuple[int, int]:
        loaded = self.models.loaded
        if loaded is not None and loaded[0] == title:
            return loaded[1].config.sample_size, loaded[1].vae.downscale
        return self.worker.geometry(title) or (512, 8)  # checked again, exactly, when the model is loaded

    def _lora_exists(self, name: str) -> None:
        from sdtorch.adapters.lora import resolve_lora

        if self.models.lora_dir is None:
            raise FileNotFoundError(f"the prompt names LoRA {name!r} but this server has no LoRA directory")
        resolve_lora(name, self.models.lora_dir)

    def retry_after(self) -> int:
        p = self.worker.progress
        per_job = (p.eta_s or 0) + 1
        return max(1, int(per_job))

    # ------------------------------------------------------------------------ waiting

    async def wait(self, job_id: str) -> Job:
        event = asyncio.Event()
        with self._wlock:
            self._waiters.setdefault(job_id, []).append((asyncio.get_running_loop(), event))
        job = self.store.get(job_id)
        while job.state not in FINISHED:
            try:
                await asyncio.wait_for(event.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            job = self.store.get(job_id)
        with self._wlock:
            self._waiters.pop(job_id, None)
        return job

    def _finished(self, job_id: str) -> None:
        with self._wlock:
            waiters = list(self._waiters.get(job_id, []))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    # ------------------------------------------------------------------------ reporting

    def public(self, job: Job, base: str = "") -> dict:
        p = self.worker.progress_of(job.id)
        running = job.state == "running" and p is not None
        steps = p.steps if running else job.request["body"].get("steps", 50)
        step = p.step if running else (steps if job.state == "completed" else 0)
        return {"id": job.id, "kind": job.kind, "state": job.state, "position": self.store.position(job),
                "step": step, "steps": steps, "progress": (step / steps) if steps else 0.0,
                "eta_s": p.eta_s if running else None, "error": job.error,
                "images": [f"{base}/v1/jobs/{job.id}/images/{n}" for n in range(job.images)],
                "info": job.info, "request": job.request["body"], "model": job.model,
                "created": job.created, "started": job.started, "finished": job.finished,
                **({"worker": job.worker, "attempts": job.attempts} if job.worker else {})}
