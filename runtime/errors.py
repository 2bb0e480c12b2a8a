"""Protocol-neutral errors.

The inference core raises `ServingError` with one of these codes; each protocol adapter
owns one table that maps a code onto its own status (HTTP status, gRPC StatusCode).
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    CONFLICT = "CONFLICT"  # the state is owned elsewhere, e.g. a read-only config (HTTP 409)
    TOO_LARGE = "TOO_LARGE"  # request over a configured size bound (HTTP 413)
    CLIENT_TIMEOUT = "CLIENT_TIMEOUT"  # the client did not send its request in time (HTTP 408)
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """An error with a protocol-neutral code and a message that says what was wrong.

    `version` is the version that produced it (None: no version ran the request) and
    `request_id` the request's id: adapters put both on the wire, so a client can
    attribute every answer, good or bad, to a version.
    """

    def __init__(self, code: Code, message: str, version: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.version = version
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"ServingError({self.code.value}, {self.message!r})"


def invalid(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(Code.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(Code.UNAVAILABLE, message)
