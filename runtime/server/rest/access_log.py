"""REST access log: one `event=access` line per request, as a pure ASGI middleware.

`server.access_log` is read per request from the shared settings object, so a config-file
edit (or `--access-log`) applies at once:
- off:    nothing;
- sample: every 4xx/5xx answer (at most ERRORS_PER_S lines a second; the lines skipped
          are counted in the next one's `suppressed=`), plus `server.access_log_sample`
          of the other answers, evenly spaced (a deterministic accumulator, no RNG);
- all:    every request.
The line names the method, path, status, milliseconds to the last byte, the model, the
version that answered (`x-model-version`), the request id and the client address.
gRPC calls are not in it.
"""

from __future__ import annotations

import logging
import re
import time

from runtime.logs import kv
from runtime.config.settings import ServerSettings

log = logging.getLogger("splitserve.access")

ERRORS_PER_S = 100  # bounds what a flood of bad requests can write in sample mode
MAX_PATH = 256
_MODEL = re.compile(r"^/v[12]/(?:repository/)?models/([^/:]+)")


class AccessLog:
    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self._acc = 0.0  # sampling accumulator: a line each time it reaches 1
        self._window = 0  # the current second, for the error cap
        self._errors = 0
        self._suppressed = 0
        self.clock = time.monotonic  # seconds; a test may replace it

    async def __call__(self, scope, receive, send):
        mode = self.settings.access_log
        if scope["type"] != "http" or mode == "off":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        seen: dict = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["headers"] = message.get("headers") or ()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            seen.setdefault("status", 500)  # what the outer error middleware answers
            raise
        finally:
            self._finish(scope, seen, mode, t0)

    def _finish(self, scope, seen: dict, mode: str, t0: float) -> None:
        status = seen.get("status", 0)  # 0: the client went away before any answer
        suppressed = 0
        if mode != "all":
            if status >= 400 or status == 0:
                now = int(self.clock())
                if now != self._window:
                    self._window, self._errors = now, 0
                if self._errors >= ERRORS_PER_S:
                    self._suppressed += 1
                    return
                self._errors += 1
            else:
                self._acc += self.settings.access_log_sample
                if self._acc < 1.0:
                    return
                self._acc -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        ms = (time.perf_counter() - t0) * 1000.0
        out = _headers(seen.get("headers", ()))
        path = scope.get("path", "")
        m = _MODEL.match(path)
        rid = out.get(b"x-request-id") or _headers(scope.get("headers", ())).get(b"x-request-id")
        client = scope.get("client")
        fields = dict(method=scope.get("method", "-"), path=path[:MAX_PATH], status=status,
                      ms=f"{ms:.2f}", model=m.group(1) if m else "-",
                      version=_text(out.get(b"x-model-version")),
                      request_id=_text(rid)[:128], client=client[0] if client else "-")
        if suppressed:
            fields["suppressed"] = suppressed
        log.info("event=access %s", kv(**fields))


def _headers(raw) -> dict[bytes, bytes]:
    want = (b"x-request-id", b"x-model-version")
    return {k.lower(): v for k, v in raw if k.lower() in want}


def _text(v: bytes | None) -> str:
    return v.decode("latin-1") if v else "-"
