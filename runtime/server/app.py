"""Composition root: one process, one event loop, one Core; uvicorn (REST) and grpc.aio
(gRPC) in front of it; signals and graceful stop.

Stop order: stop accepting (both servers), let in-flight and queued requests finish
(bounded by drain_timeout_s), then drain and release every version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime import tracing
from runtime.service.core import Core
from runtime.errors import ServingError
from runtime.server.rest.access_log import AccessLog
from runtime.server import loops
from runtime.server.grpc import h2 as grpc_h2
from runtime.server.grpc import servicers
from runtime.server.rest import control as rest_control
from runtime.server.rest import health as rest_health
from runtime.server.rest import experiment as rest_experiment
from runtime.server.rest import jobs as rest_jobs
from runtime.server.rest import metrics as rest_metrics
from runtime.server.rest import tfs as rest_tfs
from runtime.server.rest import ui as rest_ui
from runtime.server.rest import v2 as rest_v2
from runtime.server.rest import schemas as rest_schemas
from runtime.server.banner import serving_line
from runtime.server.jobs import make_jobs
from runtime.jobs.metrics import JobsCollector
from runtime.server.http import error_response, json_response
from runtime.config.settings import Settings

log = logging.getLogger("splitserve.server")


class CloseWhenStopping:
    """Once stopping (SIGTERM), every response says `Connection: close`, so keep-alive
    clients reconnect (elsewhere) instead of writing into a connection about to close."""

    def __init__(self, app, core: Core):
        self.app = app
        self.core = core

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_closing(message):
            if message["type"] == "http.response.start" and self.core.stopping:
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)
        return await self.app(scope, receive, send_closing)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the app owns signals and stop order."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # uvicorn >= 0.29
        import contextlib
        return contextlib.nullcontext()


def build_app(core: Core) -> FastAPI:
    from runtime import __version__
    # /docs and /redoc would load Swagger UI and ReDoc from a CDN (blank offline): off;
    # /openapi.json describes the API, with the bodies in rest/schemas.py.
    app = FastAPI(title="splitserve", version=__version__, docs_url=None, redoc_url=None,
                  description="KServe v2, TF Serving REST and routing control for PyTorch models")
    rest_schemas.install(app)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        return json_response({"error": msg}, exc.status_code)

    # The one error handler: every route raises ServingError; this turns it into the answer.
    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug, not the client's fault
        log.error("event=http_internal_error path=%s error=%r", request.url.path, exc)
        log.debug("traceback", exc_info=exc)
        return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    if core.settings.jobs.only:  # a jobs worker: health, metrics and jobs, no inference API
        app.include_router(rest_metrics.build(core))
        app.include_router(rest_health.build(core))
        app.include_router(rest_jobs.build(core))
    else:
        # metrics first: its literal /v2/models/stats must win over /v2/models/{model}.
        for surface in (rest_metrics, rest_v2, rest_tfs, rest_control, rest_experiment,
                        rest_jobs, rest_ui):
            app.include_router(surface.build(core))
        app.router.routes[:0] = rest_v2.fast_routes(core)
    app.add_middleware(AccessLog, settings=core.settings.server)  # reads its mode per request
    app.add_middleware(CloseWhenStopping, core=core)
    return app


class Server:
    """Both servers over one Core. `start()` returns once both are listening.

    `reuse_port` (worker processes only): join a port other workers listen on; a single
    process keeps "a taken port is an error"."""

    reuse_port = False
    grpc_interceptors: tuple = ()   # grpcio transports
    grpc_initial_metadata: tuple = ()  # the h2 transport: sent with every response
    # A replacement worker joins ports the others serve on: it loads first, so the kernel
    # never hands a new connection to a process that would answer "unknown model".
    load_first = False

    def build_app(self):
        return build_app(self.core)

    def __init__(self, settings: Settings, core: Core | None = None):
        self.settings = settings
        # OTEL_* variables: tracing is off unless they configure it
        self.core = core if core is not None else Core(settings, tracing=tracing.from_env())
        self.core.jobs = make_jobs(self.core, consume=settings.jobs.enabled)
        self.core.metrics.registry.register(JobsCollector(self.core.jobs))
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uv: _Uvicorn | None = None
        self._uv_task: asyncio.Task | None = None
        self._grpc = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind and serve both listeners first (a taken port fails at once, and
        /v2/health/live answers during a long load), then load: returns once ready."""
        s = self.settings.server
        if self.load_first:
            try:
                await self.core.start()
            except BaseException:
                await self.stop()
                raise
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listener says TCP; without it every keep-alive response waits ~40 ms for an ACK.
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET,
                             socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # Linux: TIME_WAIT only
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((s.host, s.http_port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"HTTP could not bind {s.host}:{s.http_port}: {e.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        self.core.http_bound(s.host, self.http_port)
        cfg = uvicorn.Config(self.build_app(), log_level="warning", access_log=False,
                             http=loops.http_name(s.http),
                             lifespan="off", timeout_graceful_shutdown=s.drain_timeout_s + 5,
                             limit_concurrency=None, timeout_keep_alive=30)
        self._uv = _Uvicorn(cfg)
        self._uv_task = asyncio.get_running_loop().create_task(self._uv.serve(sockets=[sock]))
        try:
            while not self._uv.started:
                if self._uv_task.done():
                    self._uv_task.result()
                    raise RuntimeError("HTTP server exited during start")
                await asyncio.sleep(0.01)
            if self.settings.jobs.only:
                pass  # no public inference API: no gRPC listener
            elif s.grpc_transport == "h2":  # our HTTP/2, on this loop
                self._grpc, self.grpc_port = await grpc_h2.start(
                    self.core, s.host, s.grpc_port, self.reuse_port, self.grpc_initial_metadata)
            else:
                self._grpc, self.grpc_port = await servicers.start(
                    self.core, s.host, s.grpc_port, self.reuse_port, self.grpc_interceptors)
            log.info("event=listening http=%s:%s grpc=%s:%s ready=false", s.host, self.http_port,
                     s.host, self.grpc_port)
            if not self.load_first:
                await self.core.start()
            await self.core.jobs.start()
        except BaseException:
            await self.stop()
            raise
        log.info("%s", serving_line(self.core, s.host, self.http_port, self.grpc_port))

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.core.stopping = True  # readiness goes false first
        grace = self.settings.server.drain_timeout_s
        tasks = []
        # Both servers stop accepting now; the core answers what it holds (in time, or with
        # UNAVAILABLE at the drain timeout), so the servers' own grace never cuts a request.
        if self._grpc is not None:
            tasks.append(self._grpc.stop(grace + 5))
        if self._uv is not None:
            self._uv.should_exit = True
            tasks.append(self._uv_task)
        await self.core.jobs.stop()  # running jobs go back to the queue, not cut by the drain
        await self.core.inference.drain(grace)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.core.stop()
        log.info("event=stopped")

    async def serve_forever(self) -> None:
        """Start, then stop cleanly on SIGTERM or SIGINT (exit status 0).

        On the signal readiness turns false at once, requests are still served for
        `server.shutdown_delay_s` (a second signal cuts it short), then the drain starts."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = loop.create_task(self.start())
        signalled = loop.create_task(stop.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during the load: no delay, nothing to drain
            log.info("event=stopping reason=signal during=start")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await self.stop()
            return
        signalled.cancel()
        starting.result()
        await stop.wait()
        delay = self.settings.server.shutdown_delay_s
        self.core.stopping = True  # readiness 503 / NOT_SERVING now; traffic still served
        log.info("event=stopping reason=signal shutdown_delay_s=%g", delay)
        if delay > 0:
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        await self.stop()
