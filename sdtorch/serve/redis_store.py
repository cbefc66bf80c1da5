"""The job store of a cluster: the same interface as `sdtorch.serve.store.Store`, kept in Redis so
that one API node and any number of workers (`sdtorch worker`) on any machines share it.

Keys (all under `sdtorch:`): `job:ID` a hash per job (the `Store` columns plus `worker`, `attempt`,
`queue`, `signal`); `jobs` and `pending` sorted sets by sequence number; `active` the set of pending
and running ids; `lease:ID` the running worker's lease on a job (a key with a time-to-live that the
worker's heartbeat renews); `image:ID:ATTEMPT:N` the PNGs (or files under a shared folder).

Every state change is one Lua script, so it is atomic across processes. The rules that make a job
complete exactly once: a worker runs a job only after `claim` moved it from pending to running
under its name (a running job whose lease expired counts as pending: its worker died); a worker
may complete, fail or cancel only a job it still owns, in the attempt it claimed; images are
written under the attempt, and only the completed attempt's images are served.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from sdtorch.formats.atomic import atomic_write
from sdtorch.serve.store import Job

NS = "sdtorch:"

_ADD = """
if tonumber(ARGV[2]) >= 0 and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[2]) then return -1 end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, 'id', ARGV[1], 'kind', ARGV[3], 'model', ARGV[4], 'request', ARGV[5],
           'state', 'pending', 'created', ARGV[6], 'images', 0, 'attempts', 0, 'completions', 0, 'cancel', 0,
           'attempt', 0, 'queue', '')
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return seq
"""

# KEYS: job, pending, lease; ARGV: id, worker, ttl_ms, now
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' and redis.call('EXISTS', KEYS[3]) == 0 then state = 'pending' end
if state ~= 'pending' then return 0 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[4], 'worker', ARGV[2], 'attempt', attempt)
redis.call('HDEL', KEYS[1], 'signal')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return attempt
"""

# KEYS: job, lease, active; ARGV: worker, attempt, new state, now, images, info, error
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished', ARGV[4])
if ARGV[3] == 'completed' then
  redis.call('HSET', KEYS[1], 'images', ARGV[5], 'info', ARGV[6])
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
elseif ARGV[3] == 'failed' then
  redis.call('HSET', KEYS[1], 'error', ARGV[7])
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: job, lease, pending, active; ARGV: worker ('' = anyone, only if the lease expired), now
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  if redis.call('HGET', KEYS[1], 'cancel') == '1' then
    redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished', ARGV[2])
    redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
    return 2
  end
  redis.call('HSET', KEYS[1], 'requeued', ARGV[2])
elseif redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending')
redis.call('HDEL', KEYS[1], 'started')
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'seq'), redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: job, pending, active; ARGV: now
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'pending' then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished', ARGV[1])
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('ZREM', KEYS[2], id)
  redis.call('SREM', KEYS[3], id)
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
end
return state
"""

# KEYS: job, lease; ARGV: worker, ttl_ms
_RENEW = """
if redis.call('HGET', KEYS[1], 'state') == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: job; returns {cancel, signal} and clears the signal
_CONTROLS = """
local c = redis.call('HGET', KEYS[1], 'cancel')
local s = redis.call('HGET', KEYS[1], 'signal')
if s then redis.call('HDEL', KEYS[1], 'signal') end
return {c or '0', s or ''}
"""


def connect(url: str):
    try:
        import redis
    except ImportError:
        raise ImportError("a cluster needs Celery and redis-py: pip install 'sdtorch[cluster]'") from None

    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        raise OSError(f"cannot reach Redis at {url}: {e}") from None
    return client


class RedisStore:
    """`Store` on Redis. `worker` names the process using it (a worker's claims are under it);
    `results` is a shared folder for the PNGs (default: in Redis, kept `image_ttl` seconds)."""

    def __init__(self, url: str, *, worker: str = "", results: str | Path | None = None, lease_ms: int = 10_000,
                 image_ttl: int = 7 * 24 * 3600):
        self.url, self.r = url, connect(url)
        self.worker, self.lease_ms, self.image_ttl = worker, lease_ms, image_ttl
        self.results = Path(results) if results else None
        self._scripts = {name: self.r.register_script(src) for name, src in
                         (("add", _ADD), ("claim", _CLAIM), ("finish", _FINISH), ("requeue", _REQUEUE),
                          ("cancel", _CANCEL), ("renew", _RENEW), ("controls", _CONTROLS))}
        self._attempts: dict[str, int] = {}  # jobs this process claimed -> the attempt it runs

    def close(self) -> None:
        self.r.close()

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{NS}job:{job_id}"

    @staticmethod
    def _lease_key(job_id: str) -> str:
        return f"{NS}lease:{job_id}"

    def recover(self) -> list[str]:
        """Nothing to do at start: a dead worker's jobs are found by `expired` (its lease ran out)."""
        return []

    # ------------------------------------------------------------------------------ writing

    def add(self, kind: str, model: str, request: dict, max_queue: int | None = None) -> Job | None:
        job_id = str(uuid.uuid4())
        seq = self._scripts["add"](
            keys=[self._job_key(job_id), NS + "pending", NS + "active", NS + "seq", NS + "jobs"],
            args=[job_id, -1 if max_queue is None else max_queue, kind, model, json.dumps(request), time.time()])
        return None if int(seq) < 0 else self.get(job_id)

    def set_queue(self, job_id: str, queue: str) -> None:
        self.r.hset(self._job_key(job_id), "queue", queue)

    def claim_id(self, job_id: str) -> Job | None:
        """Move this pending job (or a running one whose lease expired) to running under
        `self.worker`; None if it is not there to take (finished, canceled, or someone has it)."""
        attempt = int(self._scripts["claim"](keys=[self._job_key(job_id), NS + "pending", self._lease_key(job_id)],
                                             args=[job_id, self.worker, self.lease_ms, time.time()]))
        if not attempt:
            return None
        self._attempts[job_id] = attempt
        return self.get(job_id)

    def renew(self, job_id: str) -> bool:
        return bool(self._scripts["renew"](keys=[self._job_key(job_id), self._lease_key(job_id)],
                                           args=[self.worker, self.lease_ms]))

    def _finish(self, job_id: str, state: str, images: int = 0, info: str = "", error: str = "") -> bool:
        attempt = self._attempts.get(job_id, 0)
        done = self._scripts["finish"](keys=[self._job_key(job_id), self._lease_key(job_id), NS + "active"],
                                       args=[self.worker, attempt, state, time.time(), images, info, error])
        if done or state != "completed":
            self._attempts.pop(job_id, None)
        return bool(done)

    def save_image(self, job_id: str, n: int, png: bytes):
        attempt = self._attempts.get(job_id, 0)
        if self.results is not None:
            path = self.results / job_id / f"{attempt}-{n:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            return atomic_write(path, lambda tmp: tmp.write_bytes(png))
        self.r.set(f"{NS}image:{job_id}:{attempt}:{n}", png, ex=self.image_ttl)
        return None

    def complete(self, job_id: str, images: int, info: str) -> bool:
        return self._finish(job_id, "completed", images, info)

    def fail(self, job_id: str, error: str) -> None:
        self._finish(job_id, "failed", error=error)

    def canceled(self, job_id: str) -> None:
        self._finish(job_id, "canceled")

    def requeue(self, job_id: str) -> None:
        """This worker gives a running job back (shutdown)."""
        self._scripts["requeue"](keys=[self._job_key(job_id), self._lease_key(job_id), NS + "pending", NS + "active"],
                                 args=[self.worker, time.time()])
        self._attempts.pop(job_id, None)

    def requeue_expired(self, job_id: str) -> int:
        """A running job whose worker's lease ran out: 1 = pending again, 2 = canceled (a cancel had
        been asked for), 0 = still leased (or not running)."""
        return int(self._scripts["requeue"](keys=[self._job_key(job_id), self._lease_key(job_id), NS + "pending",
                                                  NS + "active"], args=["", time.time()]))

    def cancel(self, job_id: str) -> str | None:
        state = self._scripts["cancel"](keys=[self._job_key(job_id), NS + "pending", NS + "active"], args=[time.time()])
        return None if state is None else state.decode()

    def signal(self, job_id: str, what: str) -> None:
        """A1111's interrupt / skip for a running job (its worker reads it at the next step)."""
        self.r.hset(self._job_key(job_id), "signal", what)

    def controls(self, job_id: str) -> tuple[bool, str]:
        """(cancel asked, interrupt/skip signal or '') for a running job; the signal is consumed."""
        cancel, sig = self._scripts["controls"](keys=[self._job_key(job_id)])
        return cancel == b"1", sig.decode()

    # ------------------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        d = self.r.hgetall(self._job_key(job_id))
        return _job(d) if d else None

    def jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        """The newest `limit` jobs (of one state), oldest first."""
        found, start, chunk = [], 0, max(limit, 100)
        while len(found) < limit:
            ids = self.r.zrevrange(NS + "jobs", start, start + chunk - 1)
            if not ids:
                break
            for job in self._many([i.decode() for i in ids]):
                if state is None or job.state == state:
                    found.append(job)
            start += chunk
            if state is None:
                break
        return list(reversed(found[:limit]))

    def _many(self, ids: list[str]) -> list[Job]:
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hgetall(self._job_key(i))
        return [_job(d) for d in pipe.execute() if d]

    def running(self) -> list[Job]:
        active = [i.decode() for i in self.r.smembers(NS + "active")]
        return [j for j in self._many(active) if j.state == "running"]

    def pending_jobs(self) -> list[Job]:
        return self._many([i.decode() for i in self.r.zrange(NS + "pending", 0, -1)])

    def position(self, job: Job) -> int:
        rank = self.r.zrank(NS + "pending", job.id)
        return 0 if rank is None else rank + 1

    def waiting(self) -> int:
        return self.r.scard(NS + "active")

    def image_bytes(self, job_id: str, n: int) -> bytes:
        job = self.get(job_id)
        attempt = job.attempt if job is not None else 0
        if self.results is not None:
            return (self.results / job_id / f"{attempt}-{n:05d}.png").read_bytes()
        data = self.r.get(f"{NS}image:{job_id}:{attempt}:{n}")
        if data is None:
            raise FileNotFoundError(f"image {n} of job {job_id} is no longer stored")
        return data


_INTS = ("seq", "images", "attempts", "completions", "attempt")
_FLOATS = ("created", "started", "finished")


def _job(d: dict) -> Job:
    d = {k.decode(): v.decode() for k, v in d.items()}
    out = {k: int(d.get(k, 0)) for k in _INTS}
    out |= {k: (float(d[k]) if d.get(k) else None) for k in _FLOATS}
    out |= {k: d.get(k) or None for k in ("error", "info", "worker")}
    return Job(id=d["id"], kind=d["kind"], model=d["model"], request=json.loads(d["request"]), state=d["state"],
               cancel=d.get("cancel") == "1", queue=d.get("queue", ""), **out)
