"""Wiring of the jobs system (runtime/jobs sits below the protocol layer, so the v2 codec
and the HTTP client are handed to it from here)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from runtime.config.settings import Settings
from runtime.jobs.service import JobService
from runtime.jobs.sqlite import SqliteBackend
from runtime.protocol import kserve_rest
from runtime.service.core import Core

log = logging.getLogger("splitserve.jobs")
ALL_JSON = kserve_rest.BinaryOutputs(False, {})


def default_path(settings: Settings) -> Path:
    """Beside the config file (`<stem>.jobs.sqlite`), else beside the repository folder."""
    if settings.config_path is not None:
        cfg = Path(settings.config_path).resolve()
        return cfg.with_name(cfg.stem + ".jobs.sqlite")
    return Path(settings.repository.path).resolve().parent / "splitserve.jobs.sqlite"


def make_backend(settings: Settings):
    js = settings.jobs
    if js.url is not None:
        from runtime.jobs.redis_streams import RedisBackend
        return RedisBackend(js.url)
    return SqliteBackend(js.path if js.path is not None else default_path(settings))


def make_jobs(core: Core, consume: bool = True) -> JobService:
    limits = core.settings.limits

    def decode(body: bytes, model: str):
        return kserve_rest.decode_infer(body, None, model, None, limits.max_elements)[0]

    def encode(resp) -> bytes:
        return kserve_rest.encode_infer(resp, ALL_JSON)[0]

    client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    return JobService(make_backend(core.settings), core.inference, core.settings.jobs, limits,
                      decode, encode, http_client=client, consume=consume)
