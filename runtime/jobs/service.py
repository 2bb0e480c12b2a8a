"""JobService: submit (validated, then queued), and the workers that run jobs.

A job is run through the same `InferenceService.infer` as a synchronous request, when it
starts: routed then (weights, labels, sticky key from its stored headers, experiment arm),
counted in per-version metrics and guardrails under protocol `job`, its request id the job
id. Jobs run at lower priority: at most `jobs.concurrency` at once per server, and a worker
starts its next job only while fewer than `jobs.yield_to_sync` synchronous requests are in
flight, so a burst of jobs never starves the synchronous path.

At-least-once: a claimed job holds a lease renewed every third of `jobs.lease_s`; a worker
that dies stops renewing and the job is claimed again after the lease, up to
`jobs.max_attempts` with backoff, then fails with the last reason. A graceful stop gives
running jobs back (queued, the attempt not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter

import orjson

from runtime import errors
from runtime.config.settings import JobSettings, LimitSettings
from runtime.errors import Code, ServingError
from runtime.jobs.callbacks import CallbackSender, check_url
from runtime.jobs.record import STATES, Job, QueueFull, backoff, new_job_id
from runtime.service.inference import InferenceService, validate

log = logging.getLogger("splitserve.jobs")

# A failure of the client's making (or the model's absence) does not get better on a retry.
FINAL_CODES = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.TOO_LARGE})
# Headers kept with a job: routing inputs. Credentials never are.
DROP_HEADERS = frozenset({"authorization", "cookie", "content-length", "content-type",
                          "idempotency-key", "host", "connection", "accept-encoding",
                          "user-agent", "accept"})
MAX_HEADERS = 32
MAX_TTL_S = 30 * 86_400.0
MAX_IDEM_KEY = 256


class JobService:
    """Collaborators come in built: the backend (SQLite or Redis), the inference service
    (its manager validates), the wire codec (`decode(body, model) -> InferRequest`,
    `encode(InferResponse) -> bytes`: the protocol layer sits above this one), and an HTTP
    client for callbacks."""

    def __init__(self, backend, inference: InferenceService, settings: JobSettings,
                 limits: LimitSettings, decode, encode, http_client=None, consume: bool = True):
        self.backend = backend
        self.decode = decode
        self.encode = encode
        self.inference = inference
        self.manager = inference.manager
        self.router = inference.router
        self.settings = settings
        self.limits = limits
        self.consume = consume and settings.enabled
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{new_job_id()[:8]}"
        self.callbacks = CallbackSender(http_client, settings.callback_secret,
                                        settings.callback_timeout_s) if http_client else None
        self.running = 0  # jobs in inference now (counted in inference.inflight too)
        self.running_by_model = Counter()
        self.claims = 0  # claim attempts (tests wait on it)
        self._claim_lock = asyncio.Lock()  # a per-model cap is checked and taken at once
        self.yielded = 0  # times a worker waited for synchronous requests to drain
        self._tasks: list[asyncio.Task] = []
        self._current: dict[asyncio.Task, Job] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._store_down = False  # the claim loop logs the first failure and the recovery
        # figures for the collector: in-process counters, and the backend's last snapshot
        self.counts: dict[tuple[str, str], int] = {}
        self.oldest: dict[str, float] = {}
        self.attempts = Counter()  # (model, outcome) -> n: outcome ok|retry|failed|lost
        self.callback_results = Counter()  # ok | retry | failed
        self.submitted = Counter()  # (model, result): accepted|duplicate|full|invalid

    # ---- submit ------------------------------------------------------------------------
    async def submit(self, model: str, body: bytes, headers: dict[str, str] | None = None,
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate the request against the model's signature, then queue it: (job, created).
        Bad input raises INVALID_ARGUMENT and never enters the queue."""
        try:
            job = self._build(model, body, headers or {}, idempotency_key)
        except ServingError as e:
            if e.code is not Code.NOT_FOUND:
                self.submitted[(model, "invalid")] += 1
            raise
        try:
            stored, created = await self._store(self.backend.submit(job, self.settings.max_queued))
        except QueueFull:
            self.submitted[(model, "full")] += 1
            raise ServingError(Code.RESOURCE_EXHAUSTED, f"the job queue is full: "
                               f"{self.settings.max_queued} jobs queued or running "
                               f"(jobs.max_queued); retry later") from None
        self.submitted[(model, "accepted" if created else "duplicate")] += 1
        if created:
            log.info("event=job_queued id=%s model=%s", job.id, model)
            self._wake.set()
        return stored, created

    def _build(self, model: str, body: bytes, headers: dict[str, str],
               idempotency_key: str | None) -> Job:
        self.manager.require(model)  # NOT_FOUND first
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise errors.invalid(f"malformed JSON request body: {e}") from None
        if not isinstance(doc, dict):
            raise errors.invalid("request body must be a JSON object with an 'inputs' list")
        callback = doc.pop("callback_url", None)
        ttl = doc.pop("ttl_s", None)
        if callback is not None:
            callback = check_url(callback)
        if ttl is None:
            ttl = self.settings.ttl_s
        elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_S:
            raise errors.invalid(f"ttl_s must be a number of seconds in (0, {MAX_TTL_S:g}], got {ttl!r}")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEM_KEY:
            raise errors.invalid(f"Idempotency-Key must be 1 to {MAX_IDEM_KEY} characters")
        stored = orjson.dumps(doc)
        req = self.decode(stored, model)
        self._check_signature(model, req)
        kept = {k.lower(): v for k, v in headers.items() if k.lower() not in DROP_HEADERS}
        if len(kept) > MAX_HEADERS:
            kept = dict(sorted(kept.items())[:MAX_HEADERS])
        return Job(new_job_id(), model, stored, kept, max_attempts=self.settings.max_attempts,
                   ttl_s=float(ttl), callback_url=callback, idempotency_key=idempotency_key)

    def _check_signature(self, model: str, req) -> None:
        """Against every version the routes can pick now: a job valid for one arm only
        would fail later, when the queue has long answered 202."""
        mv = self.manager.require(model)
        versions = sorted(set(mv.available)) or []
        if not versions:
            raise ServingError(Code.UNAVAILABLE, f"model '{model}' has no available version to "
                               f"validate the job against")
        for v in versions:
            handle = self.manager.acquire(model, v)
            with handle:
                validate(model, v, handle.signature, req, self.limits.max_elements)

    # ---- reads -------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        job = await self._store(self.backend.get(job_id)) if _plausible(job_id) else None
        if job is None:
            raise errors.not_found(f"no job '{job_id}' (unknown, or expired and forgotten)")
        return job

    async def list(self, model: str | None, state: str | None, limit: int,
                   cursor: str | None) -> tuple[list[Job], str | None]:
        if state is not None and state not in STATES:
            raise errors.invalid(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if cursor is not None and not cursor.isdigit():
            raise errors.invalid(f"cursor must be the 'next' value of a previous page, got {cursor!r}")
        return await self._store(self.backend.list(model, state, limit, cursor))

    async def cancel(self, job_id: str) -> Job:
        job, done = (await self._store(self.backend.cancel(job_id, time.time()))
                     if _plausible(job_id) else (None, False))
        if job is None:
            raise errors.not_found(f"no job '{job_id}'")
        if not done:
            raise ServingError(Code.CONFLICT, f"job '{job_id}' is {job.state}: only a queued job "
                               f"can be cancelled")
        log.info("event=job_cancelled id=%s model=%s", job.id, job.model)
        return job

    async def _store(self, call):
        """A store call from the API: unreachable or failing is UNAVAILABLE (503), one line."""
        try:
            return await call
        except (QueueFull, ServingError):
            raise
        except Exception as e:
            if not self._store_down:  # once per outage; each answer says it too
                self._store_down = True
                log.error("event=jobs_store_error backend=%s error=%r", self.backend.name, _line(e))
            raise ServingError(Code.UNAVAILABLE, f"the jobs store ({self.backend.name}) cannot "
                               f"be reached: {_line(e)}") from None

    # ---- workers -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers. A store that cannot be reached is logged, not fatal: the
        synchronous path serves on, the jobs API answers 503, workers keep trying."""
        try:
            await self.backend.open()
        except Exception as e:
            log.error("event=jobs_store_unreachable backend=%s error=%r", self.backend.name, _line(e))
        loop = asyncio.get_running_loop()
        if self.consume:
            self._tasks += [loop.create_task(self._worker(i), name=f"job-worker-{i}")
                            for i in range(self.settings.concurrency)]
        if self.callbacks is not None:
            self._tasks.append(loop.create_task(self._callback_loop(), name="job-callbacks"))
        self._tasks.append(loop.create_task(self._housekeeping(), name="job-housekeeping"))
        log.info("event=jobs_started backend=%s consume=%s concurrency=%d worker=%s",
                 self.backend.name, self.consume, self.settings.concurrency, self.worker_id)

    async def stop(self) -> None:
        """Stop claiming; give running jobs back (queued, attempt not counted)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.callbacks is not None:
            await self.callbacks.client.aclose()
        await self.backend.close()

    def _models(self) -> list[str]:
        """The models this server can run a job of now: loaded, under their own cap."""
        snap = self.manager.view()
        per = self.settings.models
        return [m for m in snap.names() if snap.model(m).available and
                (m not in per or per[m].concurrency is None or
                 self.running_by_model[m] < per[m].concurrency)]

    async def _claim(self) -> Job | None:
        async with self._claim_lock:
            self.claims += 1
            s = self.settings
            job = await self.backend.claim(self._models(), self.worker_id, s.lease_s, time.time())
            if job is not None:
                self.running += 1
                self.running_by_model[job.model] += 1
            return job

    def _done(self, job: Job) -> None:
        self.running -= 1
        self.running_by_model[job.model] -= 1

    async def _worker(self, n: int) -> None:
        s = self.settings
        while True:
            # lower priority than synchronous requests: wait while they are busy
            while self.inference.inflight - self.running >= s.yield_to_sync:
                self.yielded += 1
                await asyncio.sleep(0.01)
            try:
                job = await self._claim()
                if self._store_down:
                    self._store_down = False
                    log.info("event=jobs_store_reachable backend=%s", self.backend.name)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is unreachable: retry, never die; log once
                if not self._store_down:
                    self._store_down = True
                    log.error("event=job_claim_failed backend=%s error=%r", self.backend.name, _line(e))
                job = None
                await asyncio.sleep(s.poll_s * 5)
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), s.poll_s)
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the outcome could not be written: the lease runs out
                log.error("event=job_store_write_failed id=%s error=%r", job.id, _line(e))
                await asyncio.sleep(s.poll_s * 5)

    async def _run(self, job: Job) -> None:
        s = self.settings
        renew = asyncio.get_running_loop().create_task(self._renew(job))
        version, outcome = None, None
        log.info("event=job_started id=%s model=%s attempt=%d", job.id, job.model, job.attempts)
        try:
            req = self.decode(job.body, job.model)
            req.headers = job.headers
            req.protocol = "job"
            req.id = job.id  # feedback and logs name the job
            own = s.models.get(job.model)
            req.timeout_s = own.timeout_s if own is not None and own.timeout_s else s.timeout_s
            resp = await self.inference.infer(req)
            version = resp.version
            result = self.encode(resp)
            outcome = ("succeeded", result, None)
        except asyncio.CancelledError:
            renew.cancel()
            if self._stopping:  # a graceful stop: the job goes back, this try not counted
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.backend.requeue(job, self.worker_id, 0.0, None,
                                                              None, count_attempt=False))
            self._done(job)
            raise
        except ServingError as e:
            version = e.version
            outcome = ("error", None, e)
        except Exception as e:  # a bug here must not kill the worker: the job fails
            log.error("event=job_bug id=%s error=%r", job.id, e)
            outcome = ("error", None, ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}"))
        finally:
            renew.cancel()
        self._done(job)
        state, result, err = outcome
        if state == "succeeded":
            stored = await self.backend.finish(job, self.worker_id, "succeeded", version, result, None)
            self._count(job, "ok" if stored else "lost")
            log.info("event=job_finished id=%s model=%s version=%s state=succeeded attempt=%d "
                     "stored=%s", job.id, job.model, version, job.attempts, stored)
            return
        reason = f"attempt {job.attempts} of {job.max_attempts}: {err.code.value}: {err.message}"
        if err.code in FINAL_CODES or job.attempts >= job.max_attempts:
            stored = await self.backend.finish(job, self.worker_id, "failed", version, None, reason)
            self._count(job, "failed" if stored else "lost")
            log.warning("event=job_finished id=%s model=%s version=%s state=failed reason=%r",
                        job.id, job.model, version, reason)
        else:
            delay = backoff(s.backoff_s, job.attempts)
            stored = await self.backend.requeue(job, self.worker_id, delay, version, reason)
            self._count(job, "retry" if stored else "lost")
            log.warning("event=job_retry id=%s model=%s retry_in_s=%.3g reason=%r",
                        job.id, job.model, delay, reason)

    def _count(self, job: Job, outcome: str) -> None:
        self.attempts[(job.model, outcome)] += 1

    async def _renew(self, job: Job) -> None:
        every = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.backend.renew(job, self.worker_id, self.settings.lease_s):
                    log.warning("event=job_lease_lost id=%s model=%s attempt=%d", job.id,
                                job.model, job.attempts)
                    return  # another worker holds it now; our result will not be stored
            except Exception as e:
                log.error("event=job_renew_failed id=%s error=%r", job.id, e)

    # ---- callbacks and housekeeping ------------------------------------------------------
    async def _callback_loop(self) -> None:
        s = self.settings
        while True:
            try:
                job = await self.backend.claim_callback(s.callback_timeout_s * 2, time.time())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # logged by the claim loop and housekeeping; not per poll
                log.debug("event=job_callback_claim_failed error=%r", _line(e))
                job = None
            if job is None:
                await asyncio.sleep(s.poll_s)
                continue
            attempt = job.callback_attempts + 1
            job.callback_attempts, job.callback_state = attempt, "delivered"
            body = orjson.dumps(job.view())
            error = await self.callbacks.send(job.callback_url, body, job.id, attempt)
            if error is None:
                state, next_at = "delivered", 0.0
            elif attempt >= s.callback_attempts:
                state, next_at = "failed", 0.0
            else:
                state, next_at = "pending", time.time() + backoff(s.callback_backoff_s, attempt)
            self.callback_results["ok" if error is None else
                                  "failed" if state == "failed" else "retry"] += 1
            await self.backend.callback_done(job.id, state, attempt, error, next_at)
            if error is not None:
                log.warning("event=job_callback_failed id=%s attempt=%d of=%d state=%s error=%r",
                            job.id, attempt, s.callback_attempts, state, error)
            else:
                log.info("event=job_callback_delivered id=%s attempt=%d", job.id, attempt)

    async def _housekeeping(self) -> None:
        """Expiry, and the figures the collector reports (read here, off the scrape)."""
        while True:
            try:
                now = time.time()
                n = await self.backend.sweep(now)
                if n:
                    log.info("event=jobs_expired count=%d", n)
                self.counts, self.oldest = await self.backend.stats(now)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                (log.debug if self._store_down else log.error)(
                    "event=jobs_housekeeping_failed error=%r", _line(e))
            await asyncio.sleep(max(1.0, self.settings.poll_s * 5))


def _line(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def _plausible(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdef-" for c in job_id)

