"""Routing control over REST: read and replace a model's routing (labels, weights,
sticky, shadow). PUT is validated whole, persisted atomically, and token-protected."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request

from runtime.service.core import Core
from runtime.errors import invalid
from runtime.server.http import json_response, read_body
from runtime.server.rest.schemas import answers, body

MAX_ROUTING_BODY = 64 * 1024


def build(core: Core) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models/{model}/routing", responses=answers("RoutingState", 404))
    async def get_routing(model: str):
        return json_response(core.control.routing(model))

    @r.put("/v1/models/{model}/routing", openapi_extra=body("Routing"),
           responses=answers("RoutingState", 400, 401, 404, 409))
    async def put_routing(request: Request, model: str):
        core.control.authorize(request.headers.get("authorization"), f"put_routing model={model}")
        body = await read_body(request, MAX_ROUTING_BODY, core.settings.limits.request_timeout_s)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise invalid(f"routing body is not valid JSON: {e}") from None
        return json_response(await core.control.put_routing(model, obj))

    return r
