"""The embedded queue: one SQLite file in WAL mode, shared by every process that opens it.

Claims are transactions (BEGIN IMMEDIATE): a job goes to exactly one worker at a time, and
a running job carries a lease (`lease_until`) its worker renews; a job whose lease ran out
(the worker died: kill -9, a lost node) is claimable again. Every write a worker makes about
its job is guarded by (worker, attempts), the claim's token, so a worker whose lease was
taken over can no longer store a result: a result is stored once. All calls run on one
thread of this backend (sqlite3 connections are not shared between threads).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from runtime.jobs.record import Job, QueueFull

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  model TEXT NOT NULL,
  body BLOB NOT NULL,
  headers TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  max_attempts INTEGER NOT NULL,
  ttl_s REAL NOT NULL,
  callback_url TEXT,
  idem_key TEXT,
  created_at REAL NOT NULL,
  started_at REAL,
  finished_at REAL,
  expires_at REAL,
  not_before REAL NOT NULL DEFAULT 0,
  lease_until REAL,
  worker TEXT,
  version INTEGER,
  result BLOB,
  error TEXT,
  callback_state TEXT,
  callback_attempts INTEGER NOT NULL DEFAULT 0,
  callback_error TEXT,
  callback_next REAL NOT NULL DEFAULT 0,
  callback_lease REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, model, not_before);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (model, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs (callback_state, callback_next);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""

COLUMNS = ("id", "model", "body", "headers", "state", "attempts", "max_attempts", "ttl_s",
           "callback_url", "idem_key", "created_at", "started_at", "finished_at", "expires_at",
           "version", "result", "error", "callback_state", "callback_attempts", "callback_error")
_SELECT = "SELECT seq, " + ", ".join(COLUMNS) + " FROM jobs"
# Rows expired this long ago are deleted: the id answers `expired` for a while, then 404.
FORGET_S = 86_400.0


def _job(row) -> Job:
    d = dict(zip(COLUMNS, row[1:]))
    d["headers"] = orjson.loads(d["headers"])
    d["idempotency_key"] = d.pop("idem_key")
    return Job(**d)


class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jobs-sqlite")
        self._db: sqlite3.Connection | None = None

    # ---- plumbing ----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            db.execute("PRAGMA busy_timeout=30000")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def _there(self) -> bool:
        """Whether the store exists: it is created by the first submit, so a server that
        never gets a job writes no file. Reads of a store not there find nothing."""
        if self._db is None and not self.path.exists():
            return False
        self._open()
        return True

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _tx_there(self, empty, fn, *args):
        """A transaction on the store if it exists; `empty` when it does not."""
        return self._tx(fn, *args) if self._there() else empty

    def _tx(self, fn, *args):
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def open(self) -> None:
        await self._call(self._there)

    async def close(self) -> None:
        def close():
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._call(close)
        self._pool.shutdown(wait=True)

    # ---- submit, read, cancel --------------------------------------------------------
    async def submit(self, job: Job, max_active: int) -> tuple[Job, bool]:
        """(the job, True), or (the first job with this idempotency key, False)."""
        def run(db):
            if job.idempotency_key is not None:
                row = db.execute(_SELECT + " WHERE model=? AND idem_key=?",
                                 (job.model, job.idempotency_key)).fetchone()
                if row is not None:
                    return _job(row), False
            n = db.execute("SELECT count(*) FROM jobs WHERE state IN ('queued','running')").fetchone()[0]
            if n >= max_active:
                raise QueueFull(n)
            db.execute("INSERT INTO jobs (id, model, body, headers, state, max_attempts, ttl_s, "
                       "callback_url, idem_key, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (job.id, job.model, job.body, orjson.dumps(job.headers).decode(), "queued",
                        job.max_attempts, job.ttl_s, job.callback_url, job.idempotency_key,
                        job.created_at))
            return job, True
        return await self._call(self._tx, run)

    async def get(self, job_id: str) -> Job | None:
        def run():
            if not self._there():
                return None
            row = self._open().execute(_SELECT + " WHERE id=?", (job_id,)).fetchone()
            return None if row is None else _job(row)
        return await self._call(run)

    async def list(self, model: str | None, state: str | None, limit: int,
                   cursor: str | None) -> tuple[list[Job], str | None]:
        def run():
            if not self._there():
                return [], None
            where, args = ["seq > ?"], [int(cursor or 0)]
            if model is not None:
                where.append("model = ?")
                args.append(model)
            if state is not None:
                where.append("state = ?")
                args.append(state)
            rows = self._open().execute(_SELECT + " WHERE " + " AND ".join(where) +
                                        " ORDER BY seq LIMIT ?", (*args, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return [_job(r) for r in rows], (str(rows[-1][0]) if more else None)
        return await self._call(run)

    async def cancel(self, job_id: str, now: float) -> tuple[Job | None, bool]:
        """(the job after the attempt, whether this call cancelled it: only a queued job)."""
        def run(db):
            n = db.execute("UPDATE jobs SET state='cancelled', finished_at=?, expires_at=?+ttl_s, "
                       "callback_state=CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END "
                       "WHERE id=? AND state='queued'", (now, now, job_id)).rowcount
            row = db.execute(_SELECT + " WHERE id=?", (job_id,)).fetchone()
            return (None if row is None else _job(row)), n == 1
        return await self._call(self._tx_there, (None, False), run)

    # ---- the worker's side -------------------------------------------------------------
    async def claim(self, models: list[str], worker: str, lease_s: float, now: float) -> Job | None:
        """The oldest ready job of `models` (queued and due, or running with its lease run
        out), now running under `worker`; a lapsed job out of attempts fails instead."""
        if not models:
            return None

        def run(db):
            marks = ",".join("?" * len(models))
            db.execute("UPDATE jobs SET state='failed', finished_at=?, expires_at=?+ttl_s, "
                       "lease_until=NULL, worker=NULL, error='attempt ' || attempts || ' of ' || "
                       "max_attempts || ': lease expired (the worker stopped renewing it: "
                       "died or lost)', callback_state=CASE WHEN callback_url IS NULL THEN NULL "
                       "ELSE 'pending' END WHERE state='running' AND lease_until < ? AND "
                       f"attempts >= max_attempts AND model IN ({marks})", (now, now, now, *models))
            row = db.execute(_SELECT + f" WHERE model IN ({marks}) AND ((state='queued' AND "
                             "not_before <= ?) OR (state='running' AND lease_until < ?)) "
                             "ORDER BY seq LIMIT 1", (*models, now, now)).fetchone()
            if row is None:
                return None
            job = _job(row)
            job.attempts += 1
            job.state = "running"
            job.started_at = now
            db.execute("UPDATE jobs SET state='running', attempts=?, worker=?, lease_until=?, "
                       "started_at=? WHERE id=?", (job.attempts, worker, now + lease_s, now, job.id))
            return job
        return await self._call(self._tx_there, None, run)

    _GUARD = " WHERE id=? AND state='running' AND worker=? AND attempts=?"

    async def renew(self, job: Job, worker: str, lease_s: float) -> bool:
        def run():
            cur = self._open().execute("UPDATE jobs SET lease_until=?" + self._GUARD,
                                       (time.time() + lease_s, job.id, worker, job.attempts))
            return cur.rowcount == 1
        return await self._call(run)

    async def finish(self, job: Job, worker: str, state: str, version: int | None,
                     result: bytes | None, error: str | None) -> bool:
        """Store the outcome once: False when this worker no longer holds the job."""
        def run():
            now = time.time()
            cur = self._open().execute(
                "UPDATE jobs SET state=?, version=?, result=?, error=?, finished_at=?, "
                "expires_at=?+ttl_s, lease_until=NULL, worker=NULL, callback_state=CASE WHEN "
                "callback_url IS NULL THEN NULL ELSE 'pending' END" + self._GUARD,
                (state, version, result, error, now, now, job.id, worker, job.attempts))
            return cur.rowcount == 1
        return await self._call(run)

    async def requeue(self, job: Job, worker: str, delay_s: float, version: int | None,
                      error: str | None, count_attempt: bool = True) -> bool:
        """Back to queued, due after `delay_s`; `count_attempt=False` gives the attempt back
        (a graceful stop interrupted it, the job did not fail)."""
        def run():
            cur = self._open().execute(
                "UPDATE jobs SET state='queued', not_before=?, version=?, error=?, "
                "lease_until=NULL, worker=NULL, attempts=attempts-?" + self._GUARD,
                (time.time() + delay_s, version, error, 0 if count_attempt else 1,
                 job.id, worker, job.attempts))
            return cur.rowcount == 1
        return await self._call(run)

    # ---- callbacks, expiry, figures ------------------------------------------------------
    async def claim_callback(self, lease_s: float, now: float) -> Job | None:
        def run(db):
            row = db.execute(_SELECT + " WHERE callback_state='pending' AND callback_next <= ? "
                             "AND callback_lease < ? ORDER BY callback_next LIMIT 1",
                             (now, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET callback_lease=? WHERE id=?", (now + lease_s, row[1]))
            return _job(row)
        return await self._call(self._tx_there, None, run)

    async def callback_done(self, job_id: str, state: str, attempts: int, error: str | None,
                            next_at: float) -> None:
        def run():
            self._open().execute("UPDATE jobs SET callback_state=?, callback_attempts=?, "
                                 "callback_error=?, callback_next=?, callback_lease=0 WHERE id=?",
                                 (state, attempts, error, next_at, job_id))
        await self._call(run)

    async def sweep(self, now: float) -> int:
        """Finished jobs past their ttl lose their result (state `expired`); long-expired
        rows are deleted. Returns how many expired now."""
        def run(db):
            n = db.execute("UPDATE jobs SET state='expired', result=NULL, body=x'' WHERE "
                           "expires_at < ? AND state IN ('succeeded','failed','cancelled')",
                           (now,)).rowcount
            db.execute("DELETE FROM jobs WHERE state='expired' AND expires_at < ?", (now - FORGET_S,))
            return n
        return await self._call(self._tx_there, 0, run)

    async def stats(self, now: float) -> tuple[dict[tuple[str, str], int], dict[str, float]]:
        """Jobs by (model, state), and the age of each model's oldest queued job."""
        def run():
            if not self._there():
                return {}, {}
            db = self._open()
            counts = {(m, s): n for m, s, n in
                      db.execute("SELECT model, state, count(*) FROM jobs GROUP BY model, state")}
            oldest = {m: now - t for m, t in
                      db.execute("SELECT model, min(created_at) FROM jobs WHERE state='queued' "
                                 "GROUP BY model")}
            return counts, oldest
        return await self._call(run)

