"""Metrics over REST: Prometheus text (`/metrics`), Triton's statistics extension
(`/v2/models[/{m}[/versions/{v}]]/stats`) and the per-version A/B summary
(`/v1/models/{m}/metrics[?since=routing|start|<epoch>]`). Thin: every figure comes from `core.metrics`.

`/v2/models/stats` must be matched before rest_v2's `/v2/models/{model}` (which would
read it as a model named "stats"), so app.py includes this router ahead of rest_v2.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from runtime.service.core import Core
from runtime.server.http import json_response, parse_version


def build(core: Core) -> APIRouter:
    r = APIRouter()
    metrics = core.metrics

    @r.get("/metrics")
    async def prometheus(request: Request):
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    def _stats(model: str | None, version: str | None) -> Response:
        v = parse_version(version) if version is not None else None
        return json_response(metrics.statistics(model, v))

    @r.get("/v2/models/stats")
    async def all_stats():
        return _stats(None, None)

    @r.get("/v2/models/{model}/stats")
    async def model_stats(model: str):
        return _stats(model, None)

    @r.get("/v2/models/{model}/versions/{version}/stats")
    async def version_stats(model: str, version: str):
        return _stats(model, version)

    @r.get("/v1/models/{model}/metrics")
    async def summary(model: str, since: str | None = None):
        return json_response(metrics.summary(model, since))

    return r
