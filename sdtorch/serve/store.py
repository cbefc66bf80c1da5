"""The job queue and its results, in a data directory: SQLite in WAL mode for the jobs, one PNG
file per image (written atomically). Everything a client was told was accepted is on disk before
the reply; a job that was running when the process died is run again from scratch on restart.

A job row moves pending -> running -> completed | failed | canceled. `completions` counts how
often a job reached `completed` (the crash-recovery test checks it is 1 for every job);
`attempts` counts how often it was started.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sdtorch.formats.atomic import atomic_write

STATES = ("pending", "running", "completed", "failed", "canceled")
FINISHED = ("completed", "failed", "canceled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    info TEXT,
    images INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    kind: str
    model: str
    request: dict
    state: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    info: str | None
    images: int
    attempts: int
    completions: int
    cancel: bool
    worker: str | None = None  # cluster: the worker running it (or that ran it)
    attempt: int = 0  # cluster: the attempt whose images are the job's
    queue: str = ""  # cluster: the broker queue it was sent to


class Store:
    """Thread-safe: one connection, one lock (SQLite serializes writers anyway)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a crash
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def recover(self) -> list[str]:
        """After a crash: jobs left `running` go back to `pending` (their partial images removed),
        or to `canceled` when a cancel had been asked for. Returns their ids."""
        rows = self._execute("SELECT id, cancel FROM jobs WHERE state = 'running'").fetchall()
        for row in rows:
            shutil.rmtree(self.image_dir(row["id"]), ignore_errors=True)
            state = "canceled" if row["cancel"] else "pending"
            self._execute("UPDATE jobs SET state = ?, started = NULL WHERE id = ?", (state, row["id"]))
        return [row["id"] for row in rows]

    # ------------------------------------------------------------------------------ writing

    def add(self, kind: str, model: str, request: dict, max_queue: int | None = None) -> Job | None:
        """Queue a job; None when `max_queue` jobs are already waiting or running."""
        job_id = str(uuid.uuid4())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_queue is not None:
                    (n,) = self._db.execute(
                        "SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')").fetchone()
                    if n >= max_queue:
                        self._db.execute("ROLLBACK")
                        return None
                self._db.execute(
                    "INSERT INTO jobs (id, kind, model, request, state, created) VALUES (?, ?, ?, ?, 'pending', ?)",
                    (job_id, kind, model, json.dumps(request), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def claim(self) -> Job | None:
        """The oldest pending job, now marked running; None when nothing waits."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT id FROM jobs WHERE state = 'pending' ORDER BY seq LIMIT 1").fetchone()
            if row is not None:
                self._db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 "
                                 "WHERE id = ?", (time.time(), row["id"]))
            self._db.execute("COMMIT")
        return None if row is None else self.get(row["id"])

    def save_image(self, job_id: str, n: int, png: bytes) -> Path:
        path = self.image_path(job_id, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda tmp: tmp.write_bytes(png))

    def complete(self, job_id: str, images: int, info: str) -> bool:
        """Mark a running job completed (its PNGs already written). False if it was not running."""
        cur = self._execute("UPDATE jobs SET state = 'completed', finished = ?, images = ?, info = ?, "
                            "completions = completions + 1 WHERE id = ? AND state = 'running'",
                            (time.time(), images, info, job_id))
        return cur.rowcount == 1

    def fail(self, job_id: str, error: str) -> None:
        self._execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ? AND state = 'running'",
                      (time.time(), error, job_id))

    def requeue(self, job_id: str) -> None:
        """A running job that was stopped by a shutdown: pending again, to run from scratch."""
        shutil.rmtree(self.image_dir(job_id), ignore_errors=True)
        self._execute("UPDATE jobs SET state = 'pending', started = NULL WHERE id = ? AND state = 'running'", (job_id,))

    def cancel(self, job_id: str) -> str | None:
        """Cancel one job: a pending one is canceled now; a running one is flagged (the worker
        stops it at its next step and calls `canceled`). Returns the state before, None if unknown."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["state"] == "pending":
                self._db.execute("UPDATE jobs SET state = 'canceled', finished = ? WHERE id = ?", (time.time(), job_id))
            elif row is not None and row["state"] == "running":
                self._db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            self._db.execute("COMMIT")
        return None if row is None else row["state"]

    def canceled(self, job_id: str) -> None:
        shutil.rmtree(self.image_dir(job_id), ignore_errors=True)
        self._execute("UPDATE jobs SET state = 'canceled', finished = ? WHERE id = ? AND state = 'running'",
                      (time.time(), job_id))

    # ------------------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        row = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        """The newest `limit` jobs (of one state), oldest first."""
        if state is None:
            rows = self._execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = self._execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?",
                                 (state, limit)).fetchall()
        return [_job(r) for r in reversed(rows)]

    def position(self, job: Job) -> int:
        """1 for the next pending job to run, 2 for the one after, ...; 0 if not pending."""
        if job.state != "pending":
            return 0
        (n,) = self._execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND seq <= ?", (job.seq,)).fetchone()
        return n

    def waiting(self) -> int:
        (n,) = self._execute("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')").fetchone()
        return n

    def image_dir(self, job_id: str) -> Path:
        return self.dir / "images" / job_id

    def image_path(self, job_id: str, n: int) -> Path:
        return self.image_dir(job_id) / f"{n:05d}.png"

    def image_bytes(self, job_id: str, n: int) -> bytes:
        return self.image_path(job_id, n).read_bytes()


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["request"] = json.loads(d["request"])
    d["cancel"] = bool(d["cancel"])
    return Job(**d)
