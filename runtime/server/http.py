"""Shared REST plumbing: the one error-code -> HTTP status table and error answer, JSON
responses, body limits.

A full queue (RESOURCE_EXHAUSTED) answers 429 with `Retry-After`: load balancers and
clients back off and retry, where a 503 makes some of them mark the pod down.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from runtime.errors import Code, ServingError
from runtime.repository.scan import is_version_name

HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.CONFLICT: 409,
    Code.NOT_FOUND: 404,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNAUTHENTICATED: 401,
    Code.TOO_LARGE: 413,
    Code.CLIENT_TIMEOUT: 408,
    Code.INTERNAL: 500,
}


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


RETRY_AFTER_S = "1"


def error_response(e: ServingError) -> Response:
    """The one error answer: {"error": message}, the mapped status, and the headers that
    attribute it (x-request-id; x-model-version when a version produced it)."""
    headers = {}
    if e.request_id:
        headers["x-request-id"] = e.request_id
    if e.version is not None:
        headers["x-model-version"] = str(e.version)
    if e.code is Code.RESOURCE_EXHAUSTED:
        headers["retry-after"] = RETRY_AFTER_S
    return json_response({"error": e.message}, HTTP_STATUS[e.code], headers or None)


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, refusing (413) anything over `limit` without buffering it all,
    and (408) a client that does not finish sending it within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ServingError(Code.INVALID_ARGUMENT, "Content-Length is not an integer") from None
        if too_big:
            raise ServingError(Code.TOO_LARGE, f"request body of {declared} bytes exceeds "
                               f"the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServingError(Code.TOO_LARGE, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ServingError(Code.CLIENT_TIMEOUT, f"the request body did not arrive within "
                           f"{timeout_s:g}s (limits.request_timeout_s)") from None
    except ClientDisconnect:
        raise ServingError(Code.INVALID_ARGUMENT, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def parse_version(v: str) -> int:
    if not is_version_name(v):  # the repository's own rule for version folder names
        raise ServingError(Code.INVALID_ARGUMENT, f"version must be a positive integer without "
                           f"leading zeros, got {v!r}")
    return int(v)
