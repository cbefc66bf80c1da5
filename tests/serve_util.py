"""Helpers for the server tests: a server subprocess on a free loopback port, waited for by its
ready line and always stopped; small JSON/HTTP helpers. All traffic goes to 127.0.0.1."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
READY = re.compile(r"sdtorch serving on (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, proc: subprocess.Popen, log: list[str], url: str):
        self.proc, self.log, self.url = proc, log, url

    @property
    def text(self) -> str:
        return "".join(self.log)


def start(args: list[str], timeout: float = 90.0, ready: re.Pattern = READY, env: dict | None = None) -> Proc:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=HERE.parent, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None and lines.empty():
            raise AssertionError(f"server exited with {proc.returncode}:\n{''.join(log)}")
        try:
            match = ready.search(lines.get(timeout=max(0.05, deadline - time.monotonic())))
        except queue.Empty:
            stop(proc)
            raise AssertionError(f"no ready line within {timeout} s:\n{''.join(log)}") from None
        if match:
            return Proc(proc, log, match.group(1).rstrip("/") if match.groups() else "")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextmanager
def server(args: list[str], timeout: float = 90.0):
    """Start a server subprocess, wait for its ready line, yield its URL; always stop it."""
    p = start(args, timeout)
    try:
        yield p.url
    finally:
        stop(p.proc)


def serve_args(data_dir: Path, *extra: str, port: int | None = None) -> list[str]:
    return ["-m", "sdtorch.serve", "--port", str(port or free_port()), "--data-dir", str(data_dir), *extra]


def request(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get("Content-Type", "").startswith("application/json") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def get_json(url: str):
    status, body = request("GET", url)
    assert status == 200, (status, body)
    return body


def post_json(url: str, body: dict):
    status, out = request("POST", url, body)
    assert status in (200, 202), (status, out)
    return out


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)
