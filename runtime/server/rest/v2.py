"""KServe v2 / Open Inference Protocol over REST (with Triton's binary extension,
model config and repository endpoints). Thin: decode, call the core, encode."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Route

from runtime.service import metadata
from runtime.service.core import Core
from runtime.errors import invalid
from runtime.protocol import kserve_rest
from runtime.server.rest import health as rest_health
from runtime.server.http import json_response, parse_version, read_body
from runtime.server.rest.schemas import answers, body

MAX_INDEX_BODY = 64 * 1024  # {"ready": true} needs a few bytes

SERVER_NAME = "splitserve"
EXTENSIONS = ["model_repository", "model_configuration", "binary_tensor_data", "statistics",
              "schedule_policy"]


def build(core: Core) -> APIRouter:
    return _build(core)[0]


def fast_routes(core: Core) -> list[Route]:
    """The infer endpoints as plain Starlette routes, mounted ahead of everything: the
    hot path skips FastAPI's dependency solving (the APIRouter twins stay for OpenAPI)."""
    return _build(core)[1]


def _build(core: Core) -> tuple[APIRouter, list[Route]]:
    r = APIRouter()
    limits = core.settings.limits

    r.include_router(rest_health.build(core))

    @r.get("/v2")
    async def server_metadata():
        from runtime import __version__
        return json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    def _v(version: str | None) -> int | None:
        return parse_version(version) if version is not None else None

    @r.get("/v2/models/{model}")
    async def model_meta(model: str):
        return json_response(metadata.model_metadata(core.manager.view(), model))

    @r.get("/v2/models/{model}/versions/{version}")
    async def version_meta(model: str, version: str):
        return json_response(metadata.model_metadata(core.manager.view(), model, _v(version)))

    def _ready(model: str, version: str | None):
        ok = core.control.ready(model, _v(version))
        return json_response({"name": model, "ready": ok}, 200 if ok else 503)

    @r.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        return _ready(model, None)

    @r.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(model: str, version: str):
        return _ready(model, version)

    @r.get("/v2/models/{model}/config")
    async def model_config(model: str):
        return json_response(metadata.model_config(core.manager.view(), model))

    @r.get("/v2/models/{model}/versions/{version}/config")
    async def version_config(model: str, version: str):
        return json_response(metadata.model_config(core.manager.view(), model, _v(version)))

    async def _infer(request: Request, model: str, version: str | None) -> Response:
        v = _v(version)
        body = await read_body(request, limits.max_body_bytes, limits.request_timeout_s)
        hl = request.headers.get(kserve_rest.HEADER_LEN)
        if hl is not None:
            try:
                hl = int(hl)
            except ValueError:
                raise invalid(f"Inference-Header-Content-Length must be an integer, "
                              f"got {hl!r}") from None
        req, binary = kserve_rest.decode_infer(body, hl, model, v, limits.max_elements)
        req.headers = request.headers
        resp = await core.inference.infer(req)
        out, header_len = kserve_rest.encode_infer(resp, binary)
        headers = {"x-model-version": str(resp.version), "x-route": resp.route,
                   "x-request-id": resp.id}
        if header_len is None:
            return Response(out, media_type="application/json", headers=headers)
        headers[kserve_rest.HEADER_LEN] = str(header_len)
        return Response(out, media_type="application/octet-stream", headers=headers)

    INFER = {"openapi_extra": body("InferRequest"), "responses": answers("InferResponse", 400, 404, 413, 429, 503)}

    @r.post("/v2/models/{model}/infer", **INFER)
    async def infer(request: Request, model: str):
        return await _infer(request, model, None)

    @r.post("/v2/models/{model}/versions/{version}/infer", **INFER)
    async def infer_version(request: Request, model: str, version: str):
        return await _infer(request, model, version)

    async def fast_infer(request: Request) -> Response:
        p = request.path_params
        return await _infer(request, p["model"], p.get("version"))

    fast = [Route("/v2/models/{model}/infer", fast_infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", fast_infer, methods=["POST"])]

    @r.post("/v2/repository/index")
    async def repository_index(request: Request):
        body = await read_body(request, MAX_INDEX_BODY, limits.request_timeout_s)
        ready_only = False
        if body.strip():
            try:
                doc = orjson.loads(body)
            except ValueError:
                raise invalid("malformed JSON request body: expected {\"ready\": true|false}") from None
            ready_only = bool(doc.get("ready", False)) if isinstance(doc, dict) else False
        return json_response(metadata.repository_index(core.manager.view(), core.root, ready_only))

    @r.post("/v2/repository/models/{model}/load")
    async def load(request: Request, model: str):
        core.control.authorize(request.headers.get("authorization"), f"load model={model}")
        await core.control.load(model)
        return json_response({})

    @r.post("/v2/repository/models/{model}/unload")
    async def unload(request: Request, model: str):
        core.control.authorize(request.headers.get("authorization"), f"unload model={model}")
        await core.control.unload(model)
        return json_response({})

    return r, fast
