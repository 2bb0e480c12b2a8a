"""Shared REST plumbing: the one error-code -> HTTP status table, JSON responses,
body limits and the bearer-token check for state-changing endpoints."""

from __future__ import annotations

import asyncio
import hmac

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from runtime.errors import Code, ServingError
from runtime.repository import is_version_name

HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.CONFLICT: 409,
    Code.NOT_FOUND: 404,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.UNAUTHENTICATED: 401,
    Code.TOO_LARGE: 413,
    Code.CLIENT_TIMEOUT: 408,
    Code.INTERNAL: 500,
}


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(e: ServingError, headers: dict | None = None) -> Response:
    return json_response({"error": e.message}, HTTP_STATUS[e.code], headers)


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


def check_token(request: Request, token: str | None) -> None:
    """Raise UNAUTHENTICATED unless `Authorization: Bearer <token>` matches (when set)."""
    if not token:
        return
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ServingError(Code.UNAUTHENTICATED, "this endpoint changes serving state and needs "
                           "'Authorization: Bearer <token>' with the server's token")


def parse_version(v: str) -> int:
    if not is_version_name(v):  # the repository's own rule for version folder names
        raise ServingError(Code.INVALID_ARGUMENT, f"version must be a positive integer without "
                           f"leading zeros, got {v!r}")
    return int(v)
