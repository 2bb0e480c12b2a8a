"""The SQLite queue's guarantees, on a real file shared by two backends (two "workers"):
one claim per job, a lapsed lease is claimed again, a result is stored once (the worker
whose lease was taken over cannot store), out of attempts is `failed` with the reason,
a graceful give-back does not count the attempt, the idempotency key and the bound."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime.jobs.record import Job, QueueFull, new_job_id
from runtime.jobs.sqlite import SqliteBackend

pytestmark = pytest.mark.unit


def job(model="m", key=None, attempts=3) -> Job:
    return Job(new_job_id(), model, b'{"inputs":[]}', {"x-user": "u1"}, max_attempts=attempts,
               idempotency_key=key, ttl_s=60)


def run(coro):
    return asyncio.run(coro)


def test_claims_leases_and_results_stored_once(tmp_path):
    async def go():
        a, b = SqliteBackend(tmp_path / "q.sqlite"), SqliteBackend(tmp_path / "q.sqlite")
        j, created = await a.submit(job(), 10)
        assert created
        t = time.time()
        got = await a.claim(["m"], "A", 0.3, t)
        assert got.id == j.id and got.attempts == 1 and got.headers == {"x-user": "u1"}
        assert await b.claim(["m"], "B", 0.3, t) is None  # held
        assert await b.claim(["other"], "B", 0.3, t + 10) is None  # not B's model
        # A stops renewing (died): after the lease, B takes it over
        again = await b.claim(["m"], "B", 30, t + 1)
        assert again.id == j.id and again.attempts == 2
        assert not await a.renew(got, "A", 30)
        assert not await a.finish(got, "A", "succeeded", 1, b'{"old":1}', None)  # stale: refused
        assert await b.finish(again, "B", "succeeded", 2, b'{"new":1}', None)
        assert not await b.finish(again, "B", "succeeded", 2, b'{"twice":1}', None)  # once
        done = await a.get(j.id)
        assert (done.state, done.version, done.result, done.attempts) == ("succeeded", 2, b'{"new":1}', 2)
        await a.close()
        await b.close()
    run(go())


def test_out_of_attempts_after_a_lapsed_lease_is_failed_with_the_reason(tmp_path):
    async def go():
        q = SqliteBackend(tmp_path / "q.sqlite")
        j, _ = await q.submit(job(attempts=1), 10)
        t = time.time()
        assert (await q.claim(["m"], "A", 0.1, t)).attempts == 1
        assert await q.claim(["m"], "B", 0.1, t + 5) is None
        failed = await q.get(j.id)
        assert failed.state == "failed" and "attempt 1 of 1: lease expired" in failed.error
        await q.close()
    run(go())


def test_give_back_requeue_with_backoff_and_idempotency(tmp_path):
    async def go():
        q = SqliteBackend(tmp_path / "q.sqlite")
        j, _ = await q.submit(job(key="k"), 2)
        dup, created = await q.submit(job(key="k"), 2)
        assert not created and dup.id == j.id
        await q.submit(job(), 2)
        with pytest.raises(QueueFull):
            await q.submit(job(), 2)
        t = time.time()
        c = await q.claim(["m"], "A", 30, t)
        assert await q.requeue(c, "A", 0, None, None, count_attempt=False)  # a graceful stop
        c = await q.claim(["m"], "A", 30, time.time() + 0.001)
        assert c.id == j.id and c.attempts == 1
        assert await q.requeue(c, "A", 100, 1, "attempt 1 of 3: INTERNAL: boom")
        nxt = await q.claim(["m"], "A", 30, time.time())
        assert nxt.id != j.id  # the failed one waits out its backoff
        later = await q.claim(["m"], "A", 30, time.time() + 101)
        assert later.id == j.id and later.attempts == 2 and later.error.endswith("boom")
        await q.close()
    run(go())


def test_the_store_is_created_by_the_first_submit_only(tmp_path):
    """A server that never gets a job writes no file (reads and claims find nothing)."""
    async def go():
        q = SqliteBackend(tmp_path / "sub" / "q.sqlite")
        await q.open()
        t = time.time()
        assert await q.claim(["m"], "A", 1, t) is None and await q.get("ab") is None
        assert await q.list(None, None, 10, None) == ([], None)
        assert await q.sweep(t) == 0 and await q.stats(t) == ({}, {})
        assert await q.claim_callback(1, t) is None and await q.cancel("ab", t) == (None, False)
        assert not (tmp_path / "sub").exists()
        await q.submit(job(), 10)
        assert (tmp_path / "sub" / "q.sqlite").is_file()
        await q.close()
    run(go())
