"""Throughput of the cluster (`sdtorch serve --queue` + `sdtorch worker`s on Redis/Celery) with 1
and 2 workers on this machine, beside the same jobs run directly in one process, and the queue's
overhead per job; then a paper estimate for N GPU workers from the measured overheads.

    python benchmarks/scale.py [--jobs 16] [--steps 20]

Needs Debian's redis-server. Each worker (and the direct run) uses one PyTorch thread, so on a
2-core machine two workers can run side by side; the built-in 64x64 model, 20 Euler a steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], ready: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if re.search(ready, line):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def call(method: str, url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_rate(port: int) -> float | None:
    """Simple commands per second this Redis serves on this machine (redis-benchmark, GET/SET)."""
    if shutil.which("redis-benchmark") is None:
        return None
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-q", "-n", "50000", "-t", "get,set"],
                         capture_output=True, text=True, timeout=120).stdout
    rates = [float(m) for m in re.findall(r"([\d.]+) requests per second", out)]
    return min(rates) if rates else None


def body(i: int, steps: int) -> dict:
    return {"prompt": "red apple", "steps": steps, "seed": 1000 + i, "width": 64, "height": 64,
            "sampler_name": "Euler a", "cfg_scale": 5}


def direct(jobs: int, steps: int) -> float:
    """The same jobs one after another in this process (1 thread): seconds per job."""
    import torch

    import sdtorch
    from sdtorch.generate import GenerationRequest

    torch.set_num_threads(1)
    pipe = sdtorch.load()
    request = GenerationRequest("red apple", steps=steps, sampler="euler_a", scheduler="automatic", cfg_scale=5,
                                seed=0, seed_mode="a1111")
    pipe.run(request)  # warm-up
    t = time.perf_counter()
    for i in range(jobs):
        pipe.run(GenerationRequest("red apple", steps=steps, sampler="euler_a", scheduler="automatic", cfg_scale=5,
                                   seed=1000 + i, seed_mode="a1111"))
    return (time.perf_counter() - t) / jobs


def cluster(n_workers: int, jobs: int, steps: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="sdtorch-scale-"))
    rport, port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{rport}/0"
    procs = []
    try:
        time.sleep(0.5)
        api = spawn(["-m", "sdtorch.cli", "serve", "--queue", url, "--port", str(port), "--data-dir", str(folder / "api"),
                     "--preview-every", "0"], "sdtorch serving on")
        procs.append(api)
        for k in range(n_workers):
            procs.append(spawn(["-m", "sdtorch.cli", "worker", "--queue", url, "--name", f"w{k}", "--threads", "1",
                                "--preview-every", "0"], "ready", {"OMP_NUM_THREADS": "1"}))
        base = f"http://127.0.0.1:{port}"
        call("POST", f"{base}/sdapi/v1/txt2img", body(-1, steps))  # warm-up
        # Overhead: one job at a time, client wall minus the worker's own run time.
        over = []
        for i in range(4):
            t = time.time()
            job = call("POST", f"{base}/v1/jobs", {"kind": "txt2img", "request": body(i, steps)})
            while (j := call("GET", f"{base}/v1/jobs/{job['id']}"))["state"] != "completed":
                time.sleep(0.005)
            over.append((time.time() - t) - (j["finished"] - j["started"]))
        import redis as redis_py

        client = redis_py.Redis(port=rport)
        ops0 = client.info("stats")["total_commands_processed"]
        cpu0 = cpu_seconds(api.pid)
        t = time.time()
        # A1111's blocking txt2img from one thread per job: the server waits for each job itself (no
        # client polling), so the API node's CPU time below is what queueing, relaying and answering cost.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            answers = list(pool.map(lambda i: call("POST", f"{base}/sdapi/v1/txt2img", body(100 + i, steps)),
                                    range(jobs)))
        wall = time.time() - t
        assert all(len(a["images"]) == 1 for a in answers)
        ids = [j["id"] for j in call("GET", f"{base}/v1/jobs?state=completed&limit={jobs}")]
        api_cpu = (cpu_seconds(api.pid) - cpu0) / jobs
        ops = (client.info("stats")["total_commands_processed"] - ops0) / jobs
        runs = [call("GET", f"{base}/v1/jobs/{i}") for i in ids]
        redis_rps = redis_rate(rport)
        return {"jobs_s": jobs / wall, "wall": wall, "overhead_s": sorted(over)[len(over) // 2], "api_cpu_s": api_cpu, "redis_ops": ops, "redis_rps": redis_rps,
                "run_s": sum(r["finished"] - r["started"] for r in runs) / jobs}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("needs redis-server (apt-get install redis-server)")
    print(f"{os.cpu_count()} CPUs; {args.jobs} jobs x {args.steps} Euler a steps, built-in model 64x64, 1 thread each")
    one = direct(args.jobs, args.steps)
    print(f"direct, one process        : {1 / one:6.2f} jobs/s ({one:.3f} s/job)")
    rows = {}
    for n in (1, 2):
        rows[n] = res = cluster(n, args.jobs, args.steps)
        print(f"cluster, {n} worker(s)       : {res['jobs_s']:6.2f} jobs/s  ({res['jobs_s'] * one:.2f}x direct; "
              f"worker run {res['run_s']:.3f} s/job, queue overhead {res['overhead_s'] * 1000:.0f} ms/job, "
              f"API CPU {res['api_cpu_s'] * 1000:.1f} ms/job)")
    print(f"2 workers / 1 worker       : {rows[2]['jobs_s'] / rows[1]['jobs_s']:.2f}x")
    o, c = rows[1]["overhead_s"], rows[1]["api_cpu_s"]
    print("\npaper estimate for N GPU workers (job = SD 1.5 512x512, 20 steps, T seconds of GPU time):")
    for t_gpu in (1.0, 3.0):
        ceiling = 1 / c if c > 0 else float("inf")
        line = ", ".join(f"N={n}: {min(n / (t_gpu + o), ceiling):.1f}" for n in (1, 8, 64, 256))
        print(f"  T = {t_gpu:.0f} s: jobs/s = min(N / (T + {o * 1000:.0f} ms), 1 / {c * 1000:.1f} ms API CPU) -> {line}")
    ops, rps = rows[1]["redis_ops"], rows[1]["redis_rps"]
    if rps:
        print(f"  Redis commands per job, measured: {ops:.0f} (with {args.steps} steps); this Redis serves {rps:,.0f} "
              f"simple commands/s here (redis-benchmark), which caps the cluster near {rps / ops:.0f} jobs/s")
    print("  one API node's CPU per job is the first limit; API nodes share nothing but Redis, so more of them "
          "behind a load balancer would raise it (not measured)")


if __name__ == "__main__":
    main()
