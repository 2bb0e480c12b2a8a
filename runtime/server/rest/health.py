"""KServe v2 liveness and readiness: one router for every server mode (the full API, and
`serve --jobs-only`, whose pool serves no inference)."""

from __future__ import annotations

from fastapi import APIRouter

from runtime.server.http import json_response
from runtime.service.core import Core


def build(core: Core) -> APIRouter:
    r = APIRouter()

    @r.get("/v2/health/live")
    async def live():
        return json_response({"live": True})

    @r.get("/v2/health/ready")
    async def ready():
        ok = core.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    return r
