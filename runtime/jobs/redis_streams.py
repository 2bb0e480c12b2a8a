"""The fleet queue: Redis Streams (`jobs.url: redis://...`), shared by every server.

One stream per model (`<prefix>stream:<model>`, consumer group `workers`: what a KEDA
redis-streams scaler watches) carries job ids; each job is a hash (`<prefix>job:<id>`).
A worker reads new entries with XREADGROUP; a running job's lease is its entry's idle
time in the group's pending list, reset by the worker (XCLAIM ... JUSTID) every third of
`jobs.lease_s`; a worker that died stops resetting it and XAUTOCLAIM hands the entry to
another after the lease. Every state change is one Lua script (atomic on the server),
guarded by (worker, attempts) like the SQLite backend, so a result is stored once.
Backoff waits in a sorted set (`delayed:<model>`) and re-enters the stream when due;
finished jobs expire (state `expired`, result dropped) and their hash is deleted later.
"""

from __future__ import annotations

import time

import orjson

from runtime.jobs.record import STATES, Job, QueueFull

PREFIX = "splitserve:jobs:"
GROUP = "workers"
FORGET_S = 86_400
IDEM_S = 7 * 86_400
_FIELDS = ("id", "model", "body", "headers", "state", "attempts", "max_attempts", "ttl_s",
           "callback_url", "idempotency_key", "created_at", "started_at", "finished_at",
           "expires_at", "version", "result", "error", "callback_state", "callback_attempts",
           "callback_error")
_INT = {"attempts", "max_attempts", "version", "callback_attempts"}
_FLOAT = {"ttl_s", "created_at", "started_at", "finished_at", "expires_at"}
_BYTES = {"body", "result"}

# Shared by the scripts: end a job (terminal state), counted, expiring, callback queued.
_LIB = """
local function count(p, model, from, to)
  if from then redis.call('HINCRBY', p..'counts', model..'|'..from, -1) end
  redis.call('HINCRBY', p..'counts', model..'|'..to, 1)
end
local function ack(p, model, eid)
  if eid then
    redis.call('XACK', p..'stream:'..model, 'workers', eid)
    redis.call('XDEL', p..'stream:'..model, eid)
  end
end
local function ended(p, jk, id, model, from, state, now)
  local ttl = tonumber(redis.call('HGET', jk, 'ttl_s'))
  redis.call('HSET', jk, 'state', state, 'finished_at', now, 'expires_at', now + ttl)
  redis.call('HDEL', jk, 'worker', 'entry')
  count(p, model, from, state)
  redis.call('SREM', p..'active', id)
  redis.call('ZADD', p..'expiry', now + ttl, id)
  if redis.call('HEXISTS', jk, 'callback_url') == 1 then
    redis.call('HSET', jk, 'callback_state', 'pending')
    redis.call('ZADD', p..'callbacks', now, id)
  end
end
"""

SUBMIT = """
local p, id, model, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local idem = ARGV[5]
if idem ~= '' then
  local first = redis.call('GET', idem)
  if first and redis.call('EXISTS', p..'job:'..first) == 1 then return {0, first} end
end
if redis.call('SCARD', p..'active') >= max then return {-1, ''} end
redis.call('HSET', p..'job:'..id, unpack(ARGV, 6))
redis.call('SADD', p..'active', id)
redis.call('SADD', p..'models', model)
redis.call('XADD', p..'stream:'..model, '*', 'id', id)
redis.call('HINCRBY', p..'counts', model..'|queued', 1)
redis.call('ZADD', p..'index', redis.call('INCR', p..'seq'), id)
if idem ~= '' then redis.call('SET', idem, id, 'EX', %d) end
return {1, id}
""" % IDEM_S

CLAIM = _LIB + """
local p, model, id, eid, worker, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local jk = p..'job:'..id
local st = redis.call('HGET', jk, 'state')
if st ~= 'queued' and st ~= 'running' then ack(p, model, eid) return 'skip' end
local attempts = tonumber(redis.call('HGET', jk, 'attempts'))
if st == 'running' then
  if redis.call('HGET', jk, 'entry') ~= eid then ack(p, model, eid) return 'skip' end
  if attempts >= tonumber(redis.call('HGET', jk, 'max_attempts')) then
    redis.call('HSET', jk, 'error', 'attempt '..attempts..' of '..attempts..
      ': lease expired (the worker stopped renewing it: died or lost)')
    ended(p, jk, id, model, 'running', 'failed', now)
    ack(p, model, eid)
    return 'failed'
  end
end
redis.call('HSET', jk, 'state', 'running', 'attempts', attempts + 1, 'worker', worker,
           'started_at', now, 'entry', eid)
count(p, model, st, 'running')
return 'ok'
"""

_GUARD = """
local p, id, worker, attempts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p..'job:'..id
if redis.call('HGET', jk, 'state') ~= 'running' or redis.call('HGET', jk, 'worker') ~= worker
   or redis.call('HGET', jk, 'attempts') ~= attempts then return 0 end
local model = redis.call('HGET', jk, 'model')
local eid = redis.call('HGET', jk, 'entry')
"""

RENEW = _GUARD + """
redis.call('XCLAIM', p..'stream:'..model, 'workers', worker, 0, eid, 'JUSTID')
return 1
"""

FINISH = _LIB + _GUARD + """
local state, now = ARGV[5], tonumber(ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', jk, 'version', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', jk, 'result', ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HSET', jk, 'error', ARGV[9]) end
ack(p, model, eid)
ended(p, jk, id, model, 'running', state, now)
return 1
"""

REQUEUE = _LIB + _GUARD + """
local due, give_back = tonumber(ARGV[5]), ARGV[6]
if ARGV[7] ~= '' then redis.call('HSET', jk, 'version', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', jk, 'error', ARGV[8]) end
if give_back == '1' then redis.call('HINCRBY', jk, 'attempts', -1) end
redis.call('HSET', jk, 'state', 'queued')
redis.call('HDEL', jk, 'worker', 'entry')
count(p, model, 'running', 'queued')
ack(p, model, eid)
redis.call('ZADD', p..'delayed:'..model, due, id)
return 1
"""

PROMOTE = """
local p, model, now = ARGV[1], ARGV[2], ARGV[3]
local due = redis.call('ZRANGEBYSCORE', p..'delayed:'..model, '-inf', now, 'LIMIT', 0, 50)
for _, id in ipairs(due) do
  redis.call('ZREM', p..'delayed:'..model, id)
  redis.call('XADD', p..'stream:'..model, '*', 'id', id)
end
return #due
"""

CANCEL = _LIB + """
local p, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local jk = p..'job:'..id
if redis.call('HGET', jk, 'state') ~= 'queued' then return 0 end
local model = redis.call('HGET', jk, 'model')
redis.call('ZREM', p..'delayed:'..model, id)
ended(p, jk, id, model, 'queued', 'cancelled', now)
return 1
"""

CLAIM_CALLBACK = """
local p, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', p..'callbacks', '-inf', now, 'LIMIT', 0, 1)
if #ids == 0 then return false end
redis.call('ZADD', p..'callbacks', now + lease, ids[1])
return ids[1]
"""

SWEEP = """
local p, now, forget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', p..'expiry', '-inf', now, 'LIMIT', 0, 500)
local n = 0
for _, id in ipairs(ids) do
  local jk = p..'job:'..id
  local st = redis.call('HGET', jk, 'state')
  redis.call('ZREM', p..'expiry', id)
  if st == 'succeeded' or st == 'failed' or st == 'cancelled' then
    local model = redis.call('HGET', jk, 'model')
    redis.call('HSET', jk, 'state', 'expired')
    redis.call('HDEL', jk, 'result', 'body')
    redis.call('HINCRBY', p..'counts', model..'|'..st, -1)
    redis.call('HINCRBY', p..'counts', model..'|expired', 1)
    redis.call('EXPIRE', jk, forget)
    redis.call('ZREM', p..'callbacks', id)
    n = n + 1
  end
end
return n
"""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _job(h: dict) -> Job:
    d = {}
    for k in _FIELDS:
        v = h.get(k.encode())
        if v is None:
            continue
        if k in _BYTES:
            d[k] = v
        elif k in _INT:
            d[k] = int(v)
        elif k in _FLOAT:
            d[k] = float(v)
        elif k == "headers":
            d[k] = orjson.loads(v)
        else:
            d[k] = v.decode()
    d.setdefault("body", b"")
    return Job(**d)


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, prefix: str = PREFIX, client=None):
        self.url = url
        self.p = prefix
        self._client = client
        self._groups: set[str] = set()
        self._scripts = {}

    @property
    def r(self):
        if self._client is None:
            import redis.asyncio as redis  # the optional extra: splitserve[redis]
            self._client = redis.Redis.from_url(self.url, decode_responses=False)
        return self._client

    async def _run(self, name: str, *args):
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self.r.register_script(globals()[name])
        return await s(args=[self.p, *args])

    async def _group(self, model: str) -> None:
        if model in self._groups:
            return
        from redis.exceptions import ResponseError
        try:
            await self.r.xgroup_create(self.p + "stream:" + model, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(model)

    async def open(self) -> None:
        await self.r.ping()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- submit, read, cancel --------------------------------------------------------
    async def submit(self, job: Job, max_active: int) -> tuple[Job, bool]:
        await self._group(job.model)
        fields = []
        for k in _FIELDS:
            v = getattr(job, k)
            if v is None:
                continue
            fields += [k, orjson.dumps(v) if k == "headers" else v]
        idem = f"{self.p}idem:{job.model}:{job.idempotency_key}" if job.idempotency_key else ""
        code, jid = await self._run("SUBMIT", job.id, job.model, max_active, idem, *fields)
        if code == -1:
            raise QueueFull(max_active)
        if code == 0:
            first = await self.get(_s(jid))
            if first is not None:
                return first, False
        return job, True

    async def get(self, job_id: str) -> Job | None:
        h = await self.r.hgetall(self.p + "job:" + job_id)
        return _job(h) if h else None

    async def list(self, model: str | None, state: str | None, limit: int,
                   cursor: str | None) -> tuple[list[Job], str | None]:
        out: list[Job] = []
        after, scanned = int(cursor or 0), 0
        while len(out) < limit and scanned < 20 * limit + 1000:
            rows = await self.r.zrangebyscore(self.p + "index", f"({after}", "+inf", start=0,
                                              num=200, withscores=True)
            if not rows:
                return out, None
            for jid, seq in rows:
                after, scanned = int(seq), scanned + 1
                j = await self.get(_s(jid))
                if j is None:
                    await self.r.zrem(self.p + "index", jid)
                    continue
                if (model is None or j.model == model) and (state is None or j.state == state):
                    out.append(j)
                    if len(out) == limit:
                        break
        more = await self.r.zcount(self.p + "index", f"({after}", "+inf")
        return out, (str(after) if more else None)

    async def cancel(self, job_id: str, now: float) -> tuple[Job | None, bool]:
        done = await self._run("CANCEL", job_id, now)
        return await self.get(job_id), bool(done)

    # ---- the worker's side -------------------------------------------------------------
    async def claim(self, models: list[str], worker: str, lease_s: float, now: float) -> Job | None:
        from redis.exceptions import ResponseError
        for model in models:
            try:
                job = await self._claim(model, worker, lease_s, now)
            except ResponseError as e:
                if "NOGROUP" in str(e):  # the stream was deleted under us: made again next time
                    self._groups.discard(model)
                raise
            if job is not None:
                return job
        return None

    async def _claim(self, model: str, worker: str, lease_s: float, now: float) -> Job | None:
        await self._group(model)
        stream = self.p + "stream:" + model
        await self._run("PROMOTE", model, now)
        # a dead consumer's entries first (idle past the lease), then new ones
        _, claimed, *_ = await self.r.xautoclaim(stream, GROUP, worker, int(lease_s * 1000),
                                                 "0-0", count=1)
        entries = claimed or []
        if not entries:
            got = await self.r.xreadgroup(GROUP, worker, {stream: ">"}, count=1)
            entries = got[0][1] if got else []
        for eid, fields in entries:
            jid = _s(fields[b"id"]) if fields else None
            if jid is None:  # deleted under us: nothing to run
                await self.r.xack(stream, GROUP, eid)
                continue
            res = _s(await self._run("CLAIM", model, jid, _s(eid), worker, now))
            if res == "ok":
                return await self.get(jid)
        return None

    async def renew(self, job: Job, worker: str, lease_s: float) -> bool:
        return bool(await self._run("RENEW", job.id, worker, job.attempts))

    async def finish(self, job: Job, worker: str, state: str, version: int | None,
                     result: bytes | None, error: str | None) -> bool:
        return bool(await self._run("FINISH", job.id, worker, job.attempts, state, time.time(),
                                    "" if version is None else version, result or b"",
                                    error or ""))

    async def requeue(self, job: Job, worker: str, delay_s: float, version: int | None,
                      error: str | None, count_attempt: bool = True) -> bool:
        return bool(await self._run("REQUEUE", job.id, worker, job.attempts, time.time() + delay_s,
                                    "0" if count_attempt else "1",
                                    "" if version is None else version, error or ""))

    # ---- callbacks, expiry, figures ------------------------------------------------------
    async def claim_callback(self, lease_s: float, now: float) -> Job | None:
        jid = await self._run("CLAIM_CALLBACK", now, lease_s)
        return await self.get(_s(jid)) if jid else None

    async def callback_done(self, job_id: str, state: str, attempts: int, error: str | None,
                            next_at: float) -> None:
        jk = self.p + "job:" + job_id
        async with self.r.pipeline(transaction=True) as p:
            p.hset(jk, mapping={"callback_state": state, "callback_attempts": attempts})
            if error is None:
                p.hdel(jk, "callback_error")
            else:
                p.hset(jk, "callback_error", error)
            if state == "pending":
                p.zadd(self.p + "callbacks", {job_id: next_at})
            else:
                p.zrem(self.p + "callbacks", job_id)
            await p.execute()

    async def sweep(self, now: float) -> int:
        return int(await self._run("SWEEP", now, FORGET_S))

    async def stats(self, now: float) -> tuple[dict[tuple[str, str], int], dict[str, float]]:
        counts = {}
        for k, n in (await self.r.hgetall(self.p + "counts")).items():
            model, _, state = _s(k).rpartition("|")
            if state in STATES:
                counts[(model, state)] = int(n)
        oldest = {}
        for m in await self.r.smembers(self.p + "models"):
            model = _s(m)
            for _, fields in await self.r.xrange(self.p + "stream:" + model, count=20):
                j = await self.get(_s(fields[b"id"]))
                if j is not None and j.state == "queued":
                    oldest[model] = now - j.created_at
                    break
        return counts, oldest
