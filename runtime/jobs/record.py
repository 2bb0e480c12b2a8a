"""A job as every backend stores it, and the one JSON view the API, the list and the
callback all show. Backend-neutral: no SQL, no Redis here."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import orjson

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
ACTIVE = frozenset({"queued", "running"})  # what jobs.max_queued bounds


def new_job_id() -> str:
    """128 random bits: a job id is also a capability to read its result."""
    return os.urandom(16).hex()


class QueueFull(Exception):
    """jobs.max_queued jobs are queued or running: the submit is refused (429)."""


@dataclass(slots=True)
class Job:
    id: str
    model: str
    body: bytes  # the v2 inference request, JSON, as validated at submit
    headers: dict[str, str] = field(default_factory=dict)  # routing inputs (sticky key)
    state: str = "queued"
    attempts: int = 0
    max_attempts: int = 3
    ttl_s: float = 86_400.0
    callback_url: str | None = None
    idempotency_key: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    version: int | None = None  # the version that served the last attempt
    result: bytes | None = None  # the v2 response, JSON, stored once
    error: str | None = None
    callback_state: str | None = None  # pending | delivered | failed
    callback_attempts: int = 0
    callback_error: str | None = None

    def view(self) -> dict:
        """GET /v1/jobs/{id}, list rows (without result) and the callback body."""
        out = {"id": self.id, "model": self.model, "state": self.state,
               "attempts": self.attempts, "max_attempts": self.max_attempts,
               "version": self.version, "created_at": self.created_at,
               "started_at": self.started_at, "finished_at": self.finished_at,
               "expires_at": self.expires_at}
        if self.result is not None:
            out["result"] = orjson.loads(self.result)
        if self.error is not None:
            out["error"] = self.error
        if self.callback_url is not None:
            out["callback"] = {"url": self.callback_url, "state": self.callback_state,
                               "attempts": self.callback_attempts, "error": self.callback_error}
        return out


def backoff(base_s: float, attempt: int, cap_s: float = 300.0) -> float:
    """Delay before attempt `attempt + 1`: base * 2**(attempt - 1), capped."""
    return min(cap_s, base_s * (2 ** max(0, attempt - 1)))
