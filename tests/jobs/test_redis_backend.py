"""The Redis Streams queue against a real redis-server: one claim per job, a dead
consumer's entry taken over by XAUTOCLAIM after the lease, a result stored once, out of
attempts `failed`, backoff through the delayed set, cancel, idempotency, the bound,
callbacks and expiry."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobs_helpers import RedisServer
from runtime.jobs.record import Job, QueueFull, new_job_id
from runtime.jobs.redis_streams import RedisBackend


@pytest.fixture
def redis_url(tmp_path):
    srv = RedisServer(tmp_path / "redis")
    yield srv.url
    srv.stop()


def job(model="m", key=None, attempts=3, callback=None, ttl=60.0) -> Job:
    return Job(new_job_id(), model, b'{"inputs":[]}', {"x-user": "u1"}, max_attempts=attempts,
               idempotency_key=key, ttl_s=ttl, callback_url=callback)


def test_claims_xautoclaim_takeover_and_result_stored_once(redis_url):
    async def go():
        a, b = RedisBackend(redis_url), RedisBackend(redis_url)
        j, created = await a.submit(job(), 10)
        assert created
        got = await a.claim(["m"], "A", 0.3, time.time())
        assert got.id == j.id and got.attempts == 1 and got.state == "running"
        assert got.headers == {"x-user": "u1"} and got.body == b'{"inputs":[]}'
        assert await b.claim(["m"], "B", 0.3, time.time()) is None  # held, lease not out
        assert await a.renew(got, "A", 0.3)
        await asyncio.sleep(0.4)  # A stops renewing: its entry idles past the lease
        again = await b.claim(["m"], "B", 0.3, time.time())
        assert again.id == j.id and again.attempts == 2
        assert not await a.renew(got, "A", 0.3)
        assert not await a.finish(got, "A", "succeeded", 1, b'{"old":1}', None)
        assert await b.finish(again, "B", "succeeded", 2, b'{"new":1}', None)
        assert not await b.finish(again, "B", "succeeded", 2, b'{"x":1}', None)
        done = await a.get(j.id)
        assert (done.state, done.version, done.result, done.attempts) == ("succeeded", 2, b'{"new":1}', 2)
        counts, _ = await a.stats(time.time())
        assert counts[("m", "succeeded")] == 1 and counts[("m", "running")] == 0
        assert await a.claim(["m"], "A", 0.3, time.time()) is None  # nothing left, acked
        await a.close()
        await b.close()
    asyncio.run(go())


def test_out_of_attempts_backoff_cancel_idempotency_bound(redis_url):
    async def go():
        q = RedisBackend(redis_url)
        one, _ = await q.submit(job(attempts=1), 3)
        c = await q.claim(["m"], "A", 0.1, time.time())
        assert c.id == one.id
        await asyncio.sleep(0.2)
        assert await q.claim(["m"], "B", 0.1, time.time()) is None
        assert (await q.get(one.id)).state == "failed"
        assert "lease expired" in (await q.get(one.id)).error
        k, _ = await q.submit(job(key="k"), 3)
        dup, created = await q.submit(job(key="k"), 3)
        assert not created and dup.id == k.id
        other, _ = await q.submit(job(), 3)
        third, _ = await q.submit(job(), 3)
        with pytest.raises(QueueFull):
            await q.submit(job(), 3)
        cancelled, done = await q.cancel(third.id, time.time())
        assert done and cancelled.state == "cancelled"
        assert not (await q.cancel(third.id, time.time()))[1]
        c = await q.claim(["m"], "A", 30, time.time())
        assert c.id == k.id
        assert await q.requeue(c, "A", 0.3, 1, "attempt 1 of 3: INTERNAL: boom")
        assert (await q.claim(["m"], "A", 30, time.time())).id == other.id  # k waits
        assert await q.claim(["m"], "A", 30, time.time()) is None  # third: cancelled, skipped
        await asyncio.sleep(0.35)
        later = await q.claim(["m"], "A", 30, time.time())
        assert later.id == k.id and later.attempts == 2 and later.error.endswith("boom")
        page, nxt = await q.list("m", None, 2, None)
        page2, nxt2 = await q.list("m", None, 2, nxt)
        assert [j.id for j in page + page2] == [one.id, k.id, other.id, third.id] and nxt2 is None
        await q.close()
    asyncio.run(go())


def test_callbacks_and_expiry(redis_url):
    async def go():
        q = RedisBackend(redis_url)
        j, _ = await q.submit(job(callback="http://127.0.0.1:9/x", ttl=0.2), 3)
        c = await q.claim(["m"], "A", 30, time.time())
        assert await q.finish(c, "A", "succeeded", 1, b'{"r":1}', None)
        cb = await q.claim_callback(10, time.time())
        assert cb.id == j.id and cb.callback_state == "pending"
        assert await q.claim_callback(10, time.time()) is None  # leased
        await q.callback_done(j.id, "delivered", 1, None, 0)
        assert (await q.get(j.id)).callback_state == "delivered"
        assert await q.sweep(time.time() + 1) == 1
        gone = await q.get(j.id)
        assert gone.state == "expired" and gone.result is None
        await q.close()
    asyncio.run(go())
