"""The cluster: one API node (`sdtorch serve --queue`) and worker processes (`sdtorch worker`)
over Debian's redis-server on 127.0.0.1, with Celery as the task engine. Jobs complete exactly
once, a killed worker's job completes on another, cancel reaches the worker running the job.
All traffic stays on loopback; every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_util import free_port, get_json, post_json, request, start, stop, wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="Debian's redis-server is not installed (.ci/run installs it)")

WORKER_READY = re.compile(r"sdtorch worker (\S+) ready")
LEASE = 4.0  # seconds: the test workers' lease (the default is 10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), 20, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    stop(proc)


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:  # noqa: BLE001  not up yet
        return False


@pytest.fixture
def r(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


MODELS: dict[str, str] = {}  # worker name -> the checkpoint it loads at start


def _worker(url: str, name: str):
    models = Path(MODELS[name]).parent
    return start(["-m", "sdtorch.cli", "worker", "--queue", url, "--name", name, "--threads", "1", "--lease", str(LEASE),
                  "--checkpoint", MODELS[name], "--models-dir", str(models)],
                 timeout=180, ready=WORKER_READY, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cluster(redis_url, tmp_path_factory):
    """The API node and three workers sharing a models folder of two checkpoints: w1 and w2 start
    with emoji.safetensors (the built-in model), w3 with other.safetensors (the same weights under
    another name: another model to the server)."""
    import redis

    from sdtorch.generate.loading import BUILTIN

    redis.Redis.from_url(redis_url).flushdb()
    models = tmp_path_factory.mktemp("models")
    for name in ("emoji.safetensors", "other.safetensors"):
        shutil.copy(BUILTIN, models / name)
    MODELS.update(w1=str(models / "emoji.safetensors"), w2=str(models / "emoji.safetensors"),
                  w3=str(models / "other.safetensors"))
    api = start(["-m", "sdtorch.cli", "serve", "--queue", redis_url, "--port", str(free_port()),
                 "--data-dir", str(tmp_path_factory.mktemp("api")), "--checkpoint", MODELS["w1"],
                 "--models-dir", str(models)], timeout=180)
    workers = {name: _worker(redis_url, name) for name in ("w1", "w2", "w3")}
    yield api.url, workers, redis_url
    for p in [api, *workers.values()]:
        stop(p.proc)


def _job(r, job_id: str) -> dict:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"sdtorch:job:{job_id}").items()}


def _pixels(b64: str) -> np.ndarray:
    import base64

    return np.asarray(Image.open(BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_store_rules_hold_across_processes(redis_url, r):
    """Claims, leases, ownership: what makes a job complete once (two store views = two processes)."""
    from sdtorch.serve.redis_store import RedisStore

    a = RedisStore(redis_url, worker="a", lease_ms=300)
    b = RedisStore(redis_url, worker="b", lease_ms=300)
    job = a.add("txt2img", "m", {"body": {}})
    assert a.position(job) == 1 and a.waiting() == 1
    assert a.claim_id(job.id) is not None
    assert b.claim_id(job.id) is None  # a holds it
    assert not b.complete(job.id, 1, "{}")  # only the owner completes
    time.sleep(0.4)  # a's lease runs out (a "died")
    assert b.claim_id(job.id) is not None and b.get(job.id).attempt == 2
    assert not a.complete(job.id, 1, "{}")  # the zombie's late completion is refused
    b.save_image(job.id, 0, b"png")
    assert b.complete(job.id, 1, "{}") and b.get(job.id).completions == 1
    assert a.image_bytes(job.id, 0) == b"png"
    assert a.claim_id(job.id) is None  # finished: a redelivered message does nothing
    p = a.add("txt2img", "m", {"body": {}})
    assert a.cancel(p.id) == "pending" and a.get(p.id).state == "canceled" and a.claim_id(p.id) is None
    q = a.add("txt2img", "m", {"body": {}})
    assert a.claim_id(q.id) is not None
    assert b.cancel(q.id) == "running" and a.controls(q.id) == (True, "")
    assert a.add("txt2img", "m", {}, max_queue=1) is None  # q is still active
    time.sleep(0.4)
    assert a.requeue_expired(q.id) == 2 and a.get(q.id).state == "canceled"  # dead owner + cancel: canceled


def test_images_in_a_shared_folder(redis_url, r, tmp_path):
    """--results-dir: the worker writes the PNGs into a folder the API node reads (not into Redis)."""
    from sdtorch.serve.redis_store import RedisStore

    worker = RedisStore(redis_url, worker="w", results=tmp_path)
    api = RedisStore(redis_url, results=tmp_path)
    job = api.add("txt2img", "m", {"body": {}})
    assert worker.claim_id(job.id) is not None
    worker.save_image(job.id, 0, b"png-bytes")
    assert worker.complete(job.id, 1, "{}")
    assert api.image_bytes(job.id, 0) == b"png-bytes"
    assert list(tmp_path.rglob("*.png")) and not list(r.scan_iter("sdtorch:image:*"))


def test_thirty_jobs_from_six_clients_once_each_with_a_worker_killed(cluster, r):
    import webuiapi

    url, workers, redis_url = cluster
    host, port = url.removeprefix("http://").split(":")
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        api = webuiapi.WebUIApi(host=host, port=int(port))
        for k in range(5):
            seed = 100 + 5 * c + k
            try:
                results[seed] = api.txt2img(prompt="red apple", steps=24, seed=seed, cfg_scale=5, width=64, height=64)
            except BaseException as e:  # noqa: BLE001  reported below
                errors.append(e)

    killed: dict = {}

    def killer() -> None:
        def running():
            for job in get_json(f"{url}/v1/jobs?state=running"):
                if job.get("worker") and job["step"] >= 2:
                    return job
            return None

        wait_for(lambda: len(results) >= 6, 120, "six jobs done")
        job = wait_for(running, 60, "a running job", every=0.01)
        advert = json.loads(r.get(f"sdtorch:worker:{job['worker']}"))
        os.kill(advert["pid"], signal.SIGKILL)
        killed.update(job=job["id"], worker=job["worker"], at=time.time())

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)] + [threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 30 and all(len(res.images) == 1 for res in results.values())
    assert killed, "no worker was killed"
    workers[killed["worker"]].proc.wait(10)

    jobs = [_job(r, k.decode().removeprefix("sdtorch:job:")) for k in r.scan_iter("sdtorch:job:*")]
    assert len(jobs) == 30
    assert all(j["state"] == "completed" and j["completions"] == "1" for j in jobs), \
        [(j["id"], j["state"], j["completions"]) for j in jobs if j["completions"] != "1"]
    lost = _job(r, killed["job"])
    assert lost["attempts"] == "2" and lost["worker"] != killed["worker"]
    assert float(lost["requeued"]) - killed["at"] <= LEASE + 2  # queued again within the lease + the reaper's second
    assert sum(j["attempts"] == "2" for j in jobs) == 1  # no other job ran twice
    assert any(j["queue"].startswith("sdtorch.worker.") for j in jobs)  # routed to idle workers with the model

    seed = int(json.loads(lost["request"])["body"]["seed"])  # the re-run's image is the job's own image
    again = webuiapi.WebUIApi(host=host, port=int(port)).txt2img(prompt="red apple", steps=24, seed=seed, cfg_scale=5, width=64, height=64)
    assert np.array_equal(np.asarray(again.image), np.asarray(results[seed].image))
    workers[killed["worker"]] = _worker(redis_url, killed["worker"])  # back to three for the next test


def _events(url: str, into: list, stop: threading.Event) -> None:
    """Collect the API node's Server-Sent Events until `stop` (bounded by the read timeout)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/events", timeout=60) as stream:
        for line in stream:
            if line.startswith(b"data: "):
                into.append(json.loads(line[6:]))
            if stop.is_set():
                return


def test_cancel_reaches_the_worker_running_the_job(cluster, r):
    url, _, _ = cluster
    events, done_reading = [], threading.Event()
    reader = threading.Thread(target=_events, args=(url, events, done_reading), daemon=True)
    reader.start()
    job = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {"prompt": "tent", "steps": 150, "seed": 1, "batch_size": 4}})
    first = wait_for(lambda: (j := get_json(f"{url}/v1/jobs/{job['id']}"))["step"] >= 3 and j, 60, "steps reported")
    assert first["state"] == "running" and first["worker"]
    # progress and live previews relayed from the worker: the jobs API, A1111's progress, SSE
    status, png = request("GET", f"{url}/v1/jobs/{job['id']}/preview")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    progress = get_json(f"{url}/sdapi/v1/progress")
    assert progress["current_image"] and progress["state"]["sampling_step"] >= 3 and 0 < progress["progress"] < 1
    wait_for(lambda: any(e["id"] == job["id"] and "preview" in e for e in events), 30, "an SSE preview")
    rate = first["step"] / (time.time() - first["started"])  # steps per second on its worker
    asked = time.time()
    status, _ = request("DELETE", f"{url}/v1/jobs/{job['id']}")
    assert status == 200
    done = wait_for(lambda: (j := get_json(f"{url}/v1/jobs/{job['id']}"))["state"] == "canceled" and j, 30, "canceled")
    assert done["finished"] - asked < 2 + 2 / rate  # stopped at its next step, not after 150
    assert (150 - first["step"]) / rate > 3 * (done["finished"] - asked)
    wait_for(lambda: any(e["id"] == job["id"] and e["state"] == "canceled" for e in events), 30, "the SSE end event")
    done_reading.set()
    after = post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": {"prompt": "sun", "steps": 4, "seed": 2}})
    wait_for(lambda: get_json(f"{url}/v1/jobs/{after['id']}")["state"] == "completed", 60, "the next job")
    progress = get_json(f"{url}/sdapi/v1/progress")
    assert progress["state"]["job_count"] == 0


def _advert(r, name: str) -> dict:
    raw = r.get(f"sdtorch:worker:{name}")
    return json.loads(raw) if raw else {}


def test_jobs_go_to_a_free_worker_with_their_model_else_one_loads_it(cluster, r):
    url, _, _ = cluster
    names = ("w1", "w2", "w3")

    def idle() -> bool:
        return all(_advert(r, w).get("loaded") and not _advert(r, w).get("busy") for w in names)

    other = next(m["title"] for m in get_json(f"{url}/sdapi/v1/sd-models") if m["model_name"] == "other")

    def submit(steps: int, seed: int) -> str:
        body = {"prompt": "sun", "steps": steps, "seed": seed, "override_settings": {"sd_model_checkpoint": other}}
        return post_json(f"{url}/v1/jobs", {"kind": "txt2img", "request": body})["id"]

    def finished(job_id: str) -> dict:
        return wait_for(lambda: (j := get_json(f"{url}/v1/jobs/{job_id}"))["state"] in ("completed", "failed") and j,
                        120, "the job")

    def holding() -> set[str]:
        return {w for w in names if _advert(r, w).get("loaded") == other}

    wait_for(idle, 60, "three idle workers")
    if not holding():  # (earlier jobs may have made w3 switch to the first model)
        assert finished(submit(4, 0))["state"] == "completed"
        wait_for(idle, 60, "idle workers")
    have = holding()
    assert have
    first = finished(submit(4, 1))  # a free worker has the model: that worker's own queue
    assert first["state"] == "completed" and first["worker"] in have and first["model"] == other
    assert _job(r, first["id"])["queue"] == f"sdtorch.worker.{first['worker']}"
    wait_for(idle, 60, "idle workers")
    busy = [submit(150, 10 + k) for k in range(len(holding()))]  # keep every worker that has the model busy ...
    wait_for(lambda: all(get_json(f"{url}/v1/jobs/{b}")["state"] == "running" for b in busy), 60, "them busy")
    busy_workers = {get_json(f"{url}/v1/jobs/{b}")["worker"] for b in busy}
    second = finished(submit(4, 3))  # ... so the next goes to the shared queue and another worker loads the model
    assert second["state"] == "completed" and second["worker"] not in busy_workers
    assert _job(r, second["id"])["queue"] == "sdtorch"
    assert _advert(r, second["worker"])["loaded"] == other
    for b in busy:
        request("DELETE", f"{url}/v1/jobs/{b}")
    wait_for(lambda: all(get_json(f"{url}/v1/jobs/{b}")["state"] == "canceled" for b in busy), 60, "canceled")
