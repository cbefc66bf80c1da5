"""Many workers behind one API: Celery with a Redis broker carries the jobs, `RedisStore` holds
their state and images, Redis pub/sub carries progress and previews back.

    sdtorch serve  --queue redis://HOST:6379/0            # the API node: no model, it only queues
    sdtorch worker --queue redis://HOST:6379/0 [--checkpoint FILE | --models-dir DIR]   # any number

The API node (`Dispatcher`, in place of the local `Worker`):
- routes each job: to the private queue of a live, idle worker that has the job's model loaded,
  otherwise to the shared queue, which every worker takes from (and loads the model);
- relays the workers' events (progress, previews, finished) to its SSE clients and A1111 callers;
- re-queues the jobs of dead workers: a running job whose lease (renewed by its worker's heartbeat
  every lease/4) expired goes back to pending and is sent again, within lease + 1 s.

A worker (`run_worker`) is a Celery worker with one process, the solo pool (PyTorch in the main
thread), prefetch 1 and late acknowledgement: the message of a job is acknowledged only after the
job's images and record are in Redis. The task claims the job in the store first; a message for
a job that is finished, canceled or held by a live worker is acknowledged and does nothing, so a
redelivered or re-sent message never runs a job to completion twice (`RedisStore`'s rules).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from sdtorch.serve.redis_store import NS, RedisStore, connect
from sdtorch.serve.worker import Progress

log = logging.getLogger(__name__)

SHARED_QUEUE = "sdtorch"
EVENTS = NS + "events"
TASK = "sdtorch.run_job"


def private_queue(worker: str) -> str:
    return f"sdtorch.worker.{worker}"


def celery_app(url: str):
    try:
        from celery import Celery
    except ImportError:
        raise ImportError("a cluster needs Celery and redis-py: pip install 'sdtorch[cluster]'") from None

    app = Celery("sdtorch", broker=url)
    app.conf.update(
        task_acks_late=True,  # acknowledged when the task returns: after the images are stored
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a busy worker holds no second job another could run
        task_default_queue=SHARED_QUEUE,
        task_ignore_result=True,  # results live in the store, not in Celery's backend
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # A message is handed out again if unacknowledged this long; the dispatcher's lease check
        # re-sends a dead worker's job much sooner, and a late duplicate does nothing.
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


# ------------------------------------------------------------------------------ the API node


class RemoteProgress(Progress):
    """A job's progress as its worker's events report it."""

    eta: float | None = None
    updated: float = 0.0

    @property
    def eta_s(self) -> float | None:
        return self.eta


class Dispatcher:
    """The API node's stand-in for the local worker: same progress / control interface."""

    def __init__(self, store: RedisStore, url: str, publish, *, lease_s: float = 10.0):
        self.store, self.url, self.publish = store, url, publish
        self.app = celery_app(url)
        self.lease_s = lease_s
        self.on_finish = lambda job_id: None
        self._running: dict[str, RemoteProgress] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._relay = threading.Thread(target=self._relay_events, name="sdtorch-relay", daemon=True)

    # the Worker interface ------------------------------------------------------------------

    def start(self) -> None:
        """Relay and reaper in threads of their own (tests); `sdtorch serve` calls `run`."""
        self._relay.start()
        threading.Thread(target=self.run, name="sdtorch-reaper", daemon=True).start()

    def run(self, alive=lambda: True) -> None:
        if not self._relay.is_alive():
            self._relay.start()
        while not self._stopping.is_set() and alive():
            try:
                self.reap()
            except OSError as e:  # Redis went away for a moment: try again
                log.warning("reaper: %s", e)
            self._stopping.wait(1.0)

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def notify(self) -> None:
        pass

    def dispatch(self, job) -> None:
        queue = self._route(job.model)
        self.store.set_queue(job.id, queue)
        self.app.send_task(TASK, args=[job.id], queue=queue)

    @property
    def progress(self) -> Progress:
        """A1111 has one running job: the one that reported last."""
        with self._lock:
            live = sorted(self._running.values(), key=lambda p: p.updated)
        return live[-1] if live else Progress()

    def progress_of(self, job_id: str) -> Progress | None:
        with self._lock:
            return self._running.get(job_id)

    def cancel(self, job_id: str) -> None:
        pass  # the store's cancel flag is read by the job's worker at its next step

    def interrupt(self) -> None:
        for job in self.store.running():
            self.store.signal(job.id, "interrupt")

    def skip(self) -> None:
        for job in self.store.running():
            self.store.signal(job.id, "skip")

    def geometry(self, title: str) -> tuple[int, int] | None:
        for w in self.workers():
            if title in w.get("geometry", {}):
                return tuple(w["geometry"][title])
        return None

    # routing, re-queueing, events ----------------------------------------------------------

    def workers(self) -> list[dict]:
        """The live workers' adverts (each renews its own every lease/4 s)."""
        keys = list(self.store.r.scan_iter(NS + "worker:*"))
        values = self.store.r.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def _route(self, model: str) -> str:
        for w in self.workers():
            queue = private_queue(w["name"])
            if w.get("loaded") == model and not w.get("busy") and self.store.r.llen(queue) == 0:
                return queue
        return SHARED_QUEUE

    def reap(self) -> None:
        """Jobs of dead workers: running with an expired lease -> pending and sent again; pending
        in the private queue of a worker that is gone -> sent again to the shared queue."""
        alive = {w["name"] for w in self.workers()}
        for job in self.store.running():
            result = self.store.requeue_expired(job.id)
            if result == 1:
                log.warning("worker %s lost job %s: queued again", job.worker, job.id)
                self.store.set_queue(job.id, SHARED_QUEUE)
                self.app.send_task(TASK, args=[job.id], queue=SHARED_QUEUE)
            elif result == 2:
                self._finished({"id": job.id, "state": "canceled", "step": 0, "steps": 0, "eta_s": None})
        for job in self.store.pending_jobs():
            if job.queue.startswith("sdtorch.worker.") and job.queue.removeprefix("sdtorch.worker.") not in alive:
                self.store.set_queue(job.id, SHARED_QUEUE)
                self.app.send_task(TASK, args=[job.id], queue=SHARED_QUEUE)

    def _relay_events(self) -> None:
        pubsub = connect(self.url).pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(EVENTS)
        while not self._stopping.is_set():
            try:
                message = pubsub.get_message(timeout=1.0)
            except OSError as e:
                log.warning("event relay: %s", e)
                time.sleep(1.0)
                continue
            if message is None:
                continue
            event = json.loads(message["data"])
            if event["state"] == "running":
                self._update(event)
                self.publish(event)
            else:
                self._finished(event)

    def _update(self, event: dict) -> None:
        with self._lock:
            p = self._running.setdefault(event["id"], RemoteProgress(job=event["id"]))
            p.step, p.steps, p.eta, p.updated = event["step"], event["steps"], event.get("eta_s"), time.monotonic()
            for key in ("batch", "batches", "batch_step", "batch_steps", "interrupted", "skipped", "timestamp"):
                if key in event:
                    setattr(p, key, event[key])
            if "preview" in event:
                p.preview = base64.b64decode(event["preview"].split(",", 1)[1])
                p.preview_step = p.step

    def _finished(self, event: dict) -> None:
        with self._lock:
            self._running.pop(event["id"], None)
        self.publish(event)
        self.on_finish(event["id"])


# ------------------------------------------------------------------------------ the worker


@dataclass
class WorkerNode:
    """What a worker process holds: its store view, the local job runner, its name."""

    name: str
    store: RedisStore
    runner: object  # sdtorch.serve.worker.Worker
    redis: object
    lease_s: float
    busy: str | None = None

    def advert(self) -> dict:
        models = self.runner.models
        loaded = models.loaded
        geometry = {loaded[0]: [loaded[1].config.sample_size, loaded[1].vae.downscale]} if loaded else {}
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "device": "cpu",
                "models": [c.title for c in models.entries], "loaded": loaded[0] if loaded else None,
                "busy": self.busy, "geometry": geometry, "time": time.time()}

    def heartbeat(self) -> None:
        self.redis.set(f"{NS}worker:{self.name}", json.dumps(self.advert()), px=int(self.lease_s * 1000))
        if self.busy is not None:
            self.store.renew(self.busy)

    def beat_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 4):
            try:
                self.heartbeat()
            except OSError as e:
                log.warning("heartbeat: %s", e)

    def run(self, job_id: str) -> str:
        job = self.store.claim_id(job_id)
        if job is None:
            return "not claimed"  # finished, canceled, or another live worker has it
        self.busy = job_id
        self.heartbeat()
        try:
            self.runner._run(job)
        finally:
            self.busy = None
            self.heartbeat()
        return self.store.get(job_id).state


_NODE: WorkerNode | None = None


def _run_job(job_id: str) -> str:
    return _NODE.run(job_id)


def add_worker_command(sub) -> None:
    p = sub.add_parser("worker", help="run jobs from a Redis queue (`sdtorch serve --queue` is the API)")
    p.add_argument("--queue", required=True, metavar="redis://HOST:PORT/DB", help="the cluster's Redis")
    p.add_argument("--checkpoint", help="the model loaded at start (default: the built-in emoji model)")
    p.add_argument("--models-dir", help="every checkpoint in this folder can be asked for (as on the API node)")
    p.add_argument("--lora-dir")
    p.add_argument("--controlnet-dir", help="ControlNet files units name (default: MODELS_DIR/ControlNet)")
    p.add_argument("--embeddings-dir")
    p.add_argument("--styles-file")
    p.add_argument("--name", default=None, help="worker name (default: host-pid)")
    p.add_argument("--results-dir", default=None, help="a shared folder for the images (default: in Redis)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: PyTorch's)")
    p.add_argument("--lease", type=float, default=10.0, help="seconds without a heartbeat before a job is re-run")
    p.add_argument("--preview-every", type=int, default=2)
    p.add_argument("--preview", choices=("cheap", "tiny", "full"), default="cheap")
    p.add_argument("--seed-mode", choices=("a1111", "diffusers"), default="a1111")


def run_worker(args: argparse.Namespace) -> int:
    import torch

    from sdtorch.conditioning.styles import read_styles
    from sdtorch.serve import a1111
    from sdtorch.serve.models import Models, default_lora_dir
    from sdtorch.serve.worker import Worker

    global _NODE
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    store = RedisStore(args.queue, worker=name, results=args.results_dir, lease_ms=int(args.lease * 1000))
    lora_dir = args.lora_dir or default_lora_dir(args.models_dir)
    models = Models(args.checkpoint, args.models_dir, dtype=args.dtype, lora_dir=lora_dir,
                    embeddings_dir=args.embeddings_dir, controlnet_dir=args.controlnet_dir)
    models.get(models.default)
    options = {"sd_model_checkpoint": models.default, "CLIP_stop_at_last_layers": 1}

    def publish(event: dict) -> None:
        store.r.publish(EVENTS, json.dumps(event))

    runner = Worker(store, models, options, a1111.Limits(), preview_every=args.preview_every,
                    preview_mode=args.preview, publish=publish)
    runner.poll_controls = True
    runner.styles = read_styles(args.styles_file) if args.styles_file else {}
    runner.seed_mode = args.seed_mode
    _NODE = WorkerNode(name, store, runner, store.r, args.lease)
    _NODE.heartbeat()
    stop = threading.Event()
    threading.Thread(target=_NODE.beat_forever, args=(stop,), name="sdtorch-heartbeat", daemon=True).start()
    app = celery_app(args.queue)
    app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)(_run_job)
    print(f"sdtorch worker {name} ready ({models.default}), queues {SHARED_QUEUE}, {private_queue(name)}", flush=True)
    try:
        app.worker_main(["--quiet", "worker", "--pool=solo", "--concurrency=1", "-n", f"{name}@%h", "-Q",
                         f"{SHARED_QUEUE},{private_queue(name)}", "--without-gossip", "--without-mingle",
                         "--without-heartbeat", "--loglevel=WARNING"])
    finally:
        stop.set()
        store.r.delete(f"{NS}worker:{name}")
    return 0
