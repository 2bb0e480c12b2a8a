"""Experiments over REST: read one, act on it, report outcomes.

GET /v1/models/{m}/experiment; POST .../experiment/{promote|rollback|pause|resume|retry}
and POST /v1/models/{m}/feedback change serving state and are token-protected.
POST /v1/experiments/peers is the replicas' own (runtime/decider/fleet.py): a push of
counts and records, or a forwarded action or feedback, for the experiment decider.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request

from runtime.service.core import Core
from runtime.errors import Code, invalid, not_found
from runtime.server.http import HTTP_STATUS, json_response, read_body
from runtime.server.rest.schemas import answers, body

MAX_FEEDBACK_BODY = 1024 * 1024
MAX_PEER_BODY = 4 << 20  # runtime/decider/fleet.py MAX_PUSH_BYTES
ACTIONS = ("promote", "rollback", "pause", "resume", "retry")


def build(core: Core) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models/{model}/experiment", responses=answers("Experiment", 404))
    async def get_experiment(model: str):
        core.manager.require(model)
        return json_response(core.experiments.view(model))

    @r.post("/v1/models/{model}/experiment/{action}", responses=answers("Experiment", 400, 401, 404, 409))
    async def post_action(request: Request, model: str, action: str):
        core.control.authorize(request.headers.get("authorization"), f"experiment_{action} model={model}")
        core.manager.require(model)
        if action not in ACTIONS:
            raise not_found(f"unknown experiment action '{action}' (expected: {', '.join(ACTIONS)})")
        return json_response(await core.experiments.action(model, action))

    @r.post("/v1/models/{model}/feedback", openapi_extra=body("Feedback"),
            responses=answers("FeedbackResult", 400, 401, 404))
    async def post_feedback(request: Request, model: str):
        core.control.authorize(request.headers.get("authorization"), f"feedback model={model}")
        core.manager.require(model)
        body = await read_body(request, MAX_FEEDBACK_BODY, core.settings.limits.request_timeout_s)
        try:
            obj = orjson.loads(body) if body else None
        except orjson.JSONDecodeError as e:
            raise invalid(f"feedback body is not valid JSON: {e}") from None
        return json_response(await core.experiments.feedback(model, obj))

    @r.post("/v1/experiments/peers", include_in_schema=False)  # the replicas' own, not an API
    async def post_peers(request: Request):
        core.control.authorize(request.headers.get("authorization"), "experiment_peers")
        body = await read_body(request, MAX_PEER_BODY, core.settings.limits.request_timeout_s)
        try:
            call = orjson.loads(body) if body else None
        except orjson.JSONDecodeError as e:
            raise invalid(f"peer call is not valid JSON: {e}") from None
        answer = await core.experiments.peer_call(call)
        if "code" in answer:  # its status, and the code, so the sender raises the same error
            return json_response({"error": answer["message"], "code": answer["code"]},
                                 HTTP_STATUS[Code(answer["code"])])
        return json_response(answer)

    return r
