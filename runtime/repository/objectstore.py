"""Object storage behind a repository URL (s3://, gs://, az://): list and fetch, nothing else.

The only module that imports obstore, the Python binding of the Rust `object_store`
crate: one wheel without Python dependencies that speaks S3, GCS and Azure, with each
cloud's standard credential chain (environment, web identity / pod identity, instance
metadata) and `AWS_ENDPOINT_URL` for S3-compatible stores. Listing requests go through a
sliding-window rate limit, so no setting can turn polling into a bill. Errors come out
as one line: the store's own code and message, never a page of debug output.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss")
URL_RE = re.compile(r"([a-z][a-z0-9+.\-]*)://(.+)", re.IGNORECASE)
LIST_PAGE = 1000  # objects per LIST response on S3 and GCS: what a listing costs in requests


class StoreError(Exception):
    """A store operation failed; the message is one line, fit for a log or a CLI error."""


def url_scheme(text: str) -> str | None:
    """The scheme of a `scheme://...` repository, None for a plain path."""
    m = URL_RE.fullmatch(str(text))
    return m.group(1).lower() if m else None


def is_store_url(text: str) -> bool:
    return url_scheme(text) in SCHEMES


def check_url(url: str) -> str:
    """The URL itself when it names a supported store, else a one-line ValueError."""
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported repository URL {url!r}: expected s3://, gs:// or az:// "
                         "(BUCKET/PREFIX), or a local folder")
    if not URL_RE.fullmatch(url).group(2).split("/")[0]:
        raise ValueError(f"repository URL {url!r} names no bucket")
    return url


_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{1,300})</Message>|\"message\"\s*:\s*\"([^\"]{1,300})\"")
_STATUS = re.compile(r"status code: (\d{3}[^:]{0,40})")


def describe(exc: BaseException) -> str:
    """One line from an obstore error: the store's code and message, else its first line."""
    text = str(exc)
    code, msg, status = _CODE.search(text), _MESSAGE.search(text), _STATUS.search(text)
    if code or msg:
        parts = [code.group(1) if code else None,
                 (msg.group(1) or msg.group(2)) if msg else None]
        out = ": ".join(p for p in parts if p)
        return f"{out} (HTTP {status.group(1).strip()})" if status else out
    first = text.split("\n", 1)[0].split(" Debug source", 1)[0]
    first = re.sub(r"Error performing (GET|HEAD|PUT) \S+ in [0-9.]+\w+ - ", "", first)
    return (first[:300] or type(exc).__name__).strip()


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # relative to the URL's prefix, "/"-separated
    size: int
    etag: str | None
    mtime: float  # last modified, epoch seconds


class RateLimit:
    """At most `per_minute` requests in any 60-second window (a sliding log, not a bucket:
    a token bucket would allow twice the rate across a window boundary). Thread-safe."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 window_s: float = 60.0):
        self.per_minute, self.window_s, self.clock = per_minute, window_s, clock
        self._log: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        while self._log and self._log[0] <= now - self.window_s:
            self._log.popleft()

    def wait_s(self, n: int = 1) -> float:
        """Seconds until `n` more requests fit in the window (0: now)."""
        n = min(max(n, 1), self.per_minute)
        with self._lock:
            now = self.clock()
            self._trim(now)
            free = self.per_minute - len(self._log)
            if free >= n:
                return 0.0
            return self._log[n - free - 1] + self.window_s - now

    def take(self, n: int = 1) -> None:
        with self._lock:
            now = self.clock()
            self._trim(now)
            self._log.extend([now] * n)
            while len(self._log) > 4 * self.per_minute:  # bounded even if a caller overdraws
                self._log.popleft()


class Store:
    """One store URL: a listing client (short timeouts) and a fetch client (long ones, as a
    multi-gigabyte object takes minutes). Blocking calls: run them off the event loop."""

    def __init__(self, url: str, list_timeout_s: float = 30.0, fetch_timeout_s: float = 3600.0,
                 max_retries: int = 3):
        try:
            from obstore.store import from_url
        except ImportError:  # the `s3` extra: most installs serve a local folder
            raise StoreError(f"{url}: object-storage repositories need obstore: "
                             "pip install 'splitserve[s3]'") from None
        self.url = check_url(url)
        retry = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=max(list_timeout_s, 1))}
        opts = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
        if url_scheme(url) in ("s3", "s3a") and endpoint and endpoint.startswith("http://"):
            opts["allow_http"] = True  # an explicit plain-HTTP endpoint (e.g. a local MinIO)

        def make(timeout_s: float, read_s: float):
            try:
                return from_url(url, client_options={**opts, "timeout": timedelta(seconds=timeout_s),
                                                     "read_timeout": timedelta(seconds=read_s),
                                                     "connect_timeout": timedelta(seconds=10)},
                                retry_config=retry)
            except Exception as e:  # noqa: BLE001 - obstore raises several kinds
                raise StoreError(f"{url}: {describe(e)}") from None
        self._lister = make(list_timeout_s, list_timeout_s)
        self._fetcher = make(fetch_timeout_s, 60.0)  # a stalled body fails; a slow one does not

    def list(self, limit: RateLimit, max_objects: int) -> tuple[list[ObjectInfo], int]:
        """Every object under the prefix and the number of LIST requests it cost. The caller
        waits on `limit.wait_s` first; this records the requests as they are made."""
        import obstore
        out: list[ObjectInfo] = []
        pages = 1
        limit.take(1)
        try:
            for chunk in obstore.list(self._lister, chunk_size=LIST_PAGE):
                for m in chunk:
                    out.append(ObjectInfo(m["path"], int(m["size"]), m.get("e_tag"),
                                          m["last_modified"].timestamp()))
                need = max(1, math.ceil(len(out) / LIST_PAGE))
                if need > pages:
                    limit.take(need - pages)
                    pages = need
                if len(out) > max_objects:
                    raise StoreError(f"{self.url}: more than {max_objects} objects under the prefix "
                                     "(repository.store.max_objects)")
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - network, credentials, missing bucket
            raise StoreError(f"{self.url}: listing failed: {describe(e)}") from None
        return out, pages

    def fetch(self, obj: ObjectInfo, dest: Path, stop: threading.Event | None = None) -> int:
        """Stream one object into `dest` (the caller's hidden temporary path). The object
        must still be the one listed (same ETag) and have exactly the listed size."""
        import obstore
        n = 0
        try:
            res = obstore.get(self._fetcher, obj.key,
                              options={"if_match": obj.etag} if obj.etag else None)
            with open(dest, "wb") as f:
                for chunk in res.stream(min_chunk_size=8 << 20):
                    if stop is not None and stop.is_set():
                        raise StoreError(f"{obj.key}: fetch interrupted by shutdown")
                    n += len(chunk)
                    if n > obj.size:
                        break
                    f.write(chunk)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"{obj.key}: fetch failed: {describe(e)}") from None
        if n != obj.size:
            raise StoreError(f"{obj.key}: fetched {n} bytes, the listing said {obj.size}")
        os.utime(dest, (obj.mtime, obj.mtime))  # the store's time: stable fingerprints
        return n
