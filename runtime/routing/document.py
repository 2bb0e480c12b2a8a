"""The routing document's bytes, whichever source holds them: the size bound, the hash
that decides whether a re-read is news, the one rule for our own writes, and the answer
when the document is managed elsewhere."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from router import RoutingError
from runtime import errors

OnChange = Callable[[str | None], object]  # a source's callback; None: unreadable now
MAX_CONFIG_BYTES = 1024 * 1024  # a ConfigMap holds at most 1 MiB; so does our file


def read_limited(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise RoutingError("invalid", f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    return data


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def own_write(seen: str | None, before: bytes, written: bytes) -> str | None:
    """The hash to remember after we wrote `written` over `before`. Our own write is not
    news, but only when we had seen the document it started from: another process or
    replica may have written just before us (its change is in what we wrote and not yet
    applied here), so then the old hash stays and the next read delivers both."""
    return digest(written) if seen == digest(before) else seen


def conflict(where: str) -> errors.ServingError:
    return errors.ServingError(errors.Code.CONFLICT,
                               f"routing is managed by {where}; change it there")
