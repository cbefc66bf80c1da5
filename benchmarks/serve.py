"""The server's throughput, latency and overhead, side by side with the pipeline called directly.

Starts `sdtorch serve` on 127.0.0.1 (built-in model, a fresh data dir), then for 1, 4 and 8
concurrent clients submits the same set of jobs through POST /sdapi/v1/txt2img and reports
jobs/s and p50/p95 latency. The same jobs run through `Pipeline.run` in this process, one after
the other, give the baseline: the server's overhead is (server time per job / direct time per job)
- 1 at one client (goal <= 5 %). Previews are on (every 2 steps, the default) in the server and
cost is part of the overhead.

    python benchmarks/serve.py [--jobs 24] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_util import serve_args, start, stop  # noqa: E402

from sdtorch.generate import GenerationRequest, load  # noqa: E402


def job_body(i: int, steps: int) -> dict:
    return {"prompt": f"emoji {i % 9}", "seed": 1000 + i, "steps": steps, "sampler_name": "Euler"}


def post(url: str, body: dict) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
        json.loads(r.read())
    return time.perf_counter() - t


def run_clients(url: str, n_clients: int, bodies: list[dict]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    todo = list(bodies)

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop(0)
            dt = post(url, body)
            with lock:
                latencies.append(dt)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, latencies


def direct(bodies: list[dict]) -> float:
    pipe = load()
    runs = [GenerationRequest(b["prompt"], seed=b["seed"], steps=b["steps"], sampler="euler", scheduler="automatic",
                              cfg_scale=7.0) for b in bodies]
    pipe.run(runs[0])  # warm-up
    t = time.perf_counter()
    for r in runs:
        pipe.run(r)
    return time.perf_counter() - t


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    bodies = [job_body(i, args.steps) for i in range(args.jobs)]
    before = direct(bodies)  # the baseline before and after the server runs: the machine may drift
    with tempfile.TemporaryDirectory() as data:
        p = start(serve_args(Path(data)))
        try:
            post(p.url, bodies[0])  # warm-up
            results = {n: run_clients(p.url, n, bodies) for n in (1, 4, 8)}
        finally:
            stop(p.proc)
    after = direct(bodies)
    base = (before + after) / 2
    print(f"direct runs: {before:.2f} s before the server, {after:.2f} s after")
    per_job = base / len(bodies)
    print(f"built-in model, {args.jobs} jobs of {args.steps} steps (Euler, 64x64), previews every 2 steps")
    print(f"direct Pipeline.run: {len(bodies) / base:.2f} jobs/s ({per_job * 1000:.0f} ms/job)")
    print(f"{'clients':>8} {'jobs/s':>8} {'p50 s':>8} {'p95 s':>8} {'vs direct':>10}")
    for n, (total, lat) in results.items():
        print(f"{n:>8} {len(bodies) / total:>8.2f} {statistics.median(lat):>8.3f} {pct(lat, 0.95):>8.3f} "
              f"{(total / len(bodies)) / per_job:>9.3f}x")
    overhead = (results[1][0] / len(bodies)) / per_job - 1
    print(f"server overhead at 1 client: {overhead * 100:+.1f} % per job (goal <= 5 %)")


if __name__ == "__main__":
    main()
