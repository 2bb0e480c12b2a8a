"""Callbacks: on a job's end, POST its JSON view to its `callback_url`, signed.

The signature header is `X-Splitserve-Signature: sha256=<hex>`, HMAC-SHA256 of the exact
body bytes under `jobs.callback_secret`, so a receiver can check the POST came from this
fleet and was not altered. Delivery is at-least-once: durable state in the job (pending,
delivered, failed), bounded attempts with backoff; a receiver dedupes by job id.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from runtime import errors

SIGNATURE_HEADER = "X-Splitserve-Signature"
MAX_URL = 2048


def check_url(url: object) -> str:
    """The callback URL, or INVALID_ARGUMENT: absolute http(s) with a host, nothing else."""
    if not isinstance(url, str) or not url:
        raise errors.invalid("callback_url must be a non-empty string")
    if len(url) > MAX_URL:
        raise errors.invalid(f"callback_url is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise errors.invalid(f"callback_url is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.invalid(f"callback_url must be an absolute http:// or https:// URL, got {url!r}")
    return url


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does (and the tests): constant-time compare of the header."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


class CallbackSender:
    """One POST per attempt; True when the receiver answered 2xx. The HTTP client is
    passed in (an httpx.AsyncClient), so tests and the worker share one pool."""

    def __init__(self, client, secret: str | None, timeout_s: float):
        self.client = client
        self.secret = secret
        self.timeout_s = timeout_s

    async def send(self, url: str, body: bytes, job_id: str, attempt: int) -> str | None:
        """None on success, else the reason (one line)."""
        headers = {"content-type": "application/json", "x-splitserve-job": job_id,
                   "x-splitserve-attempt": str(attempt)}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            r = await self.client.post(url, content=body, headers=headers, timeout=self.timeout_s)
        except Exception as e:  # transport: refused, reset, timeout, TLS
            return f"{type(e).__name__}: {e}"[:300].replace("\n", " ")
        if 200 <= r.status_code < 300:
            return None
        return f"HTTP {r.status_code}"
