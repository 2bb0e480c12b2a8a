"""One worker process of `splitserve serve --workers N` (started by runtime/workers/supervisor.py).

A worker is a complete runtime (its own Core, event loop, REST and gRPC servers) that
joins the shared ports with SO_REUSEPORT once it has loaded, is ready once every worker
is (the supervisor's ALL_READY file in the run folder), says who answered (`x-worker: K` on every REST
response and in the initial metadata of every unary gRPC call and ModelStreamInfer
stream), and shares its metrics through
the supervisor's run folder: every `SNAPSHOT_INTERVAL_S` (when something changed) and at
exit it writes its raw counters there atomically; every read merges the other workers'
files with its own live counters (runtime/metrics/merge.py). Experiments are decided by
one worker on everyone's data (runtime/decider/workers.py). It stops on SIGTERM/SIGINT,
or when the supervisor is gone (its parent pid changes).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
from pathlib import Path

import grpc

from runtime import tracing
from runtime.metrics.merge import SnapshotDir
from runtime.server.app import Server, build_app
from runtime.service.core import Core

log = logging.getLogger("splitserve.worker")

ALL_READY = "all-workers-ready"  # in the run folder, by the supervisor (runtime/workers/supervisor.py)
SNAPSHOT_INTERVAL_S = 0.1  # the bound on how late a request shows in another worker's figures
PARENT_CHECK_S = 0.5
WORKER_HEADER = "x-worker"


class WorkerHeader:
    """Pure ASGI middleware: adds `x-worker: K` to every HTTP response."""

    def __init__(self, app, worker: int):
        self.app = app
        self.header = (WORKER_HEADER.encode(), str(worker).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_header)


class WorkerInterceptor(grpc.aio.ServerInterceptor):
    """Sends `x-worker: K` as initial metadata on every unary call and on every
    ModelStreamInfer stream (before the handler runs, so an error answer carries it too)."""

    def __init__(self, md: tuple):
        self.md = md

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        md = self.md
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def call(request, context):
                await context.send_initial_metadata(md)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if inspect.isasyncgenfunction(handler.stream_stream):  # ModelStreamInfer, reflection
            stream = handler.stream_stream

            async def streaming(request_iterator, context):
                await context.send_initial_metadata(md)
                async for response in stream(request_iterator, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                streaming, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


class WorkerServer(Server):
    """A Server that shares its ports and its metrics with the other workers."""

    reuse_port = True

    def __init__(self, settings, worker: int, run_dir: Path, replacement: bool = False):
        snapshots = SnapshotDir(run_dir, worker)
        super().__init__(settings, Core(settings, metrics_peers=snapshots.peers, tracing=tracing.from_env()))
        self.snapshots = snapshots
        self.worker = worker
        # Every worker loads before it joins the ports, not only a replacement: the kernel
        # then never hands a connection to a worker that is still loading (it answered 503
        # or "unknown model" while its siblings served). Until one has loaded, nothing listens.
        self.load_first = True
        # Ready (GET /v2/health/ready, gRPC ServerReady) only once every worker is: the
        # supervisor writes ALL_READY into the run folder when the last one has loaded.
        self._all_ready_file = Path(run_dir) / ALL_READY
        self._all_ready = False
        self.core.ready_gate = self._every_worker_ready
        self.grpc_initial_metadata = ((WORKER_HEADER, str(worker)),)  # the h2 transport sends it itself
        self.grpc_interceptors = (WorkerInterceptor(self.grpc_initial_metadata),)
        self._writer: asyncio.Task | None = None
        self._mark = None

    def build_app(self):
        return WorkerHeader(build_app(self.core), self.worker)

    def _every_worker_ready(self) -> bool:
        if not self._all_ready:  # once written it stays: replacements load before they join
            self._all_ready = self._all_ready_file.exists()
        return self._all_ready

    def write_snapshot(self, force: bool = False) -> None:
        m = self.core.metrics
        mark = m.change_mark()
        if force or mark != self._mark:
            self.snapshots.write(m.export_state())
            self._mark = mark

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            try:
                self.write_snapshot()
            except OSError as e:
                log.warning("event=metrics_snapshot_failed error=%r", e)

    async def start(self) -> None:
        self.core.experiments.share(self.snapshots.path, self.worker)  # one decider among us
        await super().start()
        self.write_snapshot(force=True)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def stop(self) -> None:
        await super().stop()
        if self._writer is not None:
            self._writer.cancel()
        self.write_snapshot(force=True)  # the last counts, after the drain


class _Tag(logging.Filter):
    """`worker=K ` in front of every line; a worker's own serving line is renamed
    `event=worker_serving` (the supervisor writes the one `event=serving` line)."""

    def __init__(self, worker: int):
        super().__init__()
        self.prefix = f"worker={worker} "

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("event=serving "):
            msg = "event=worker_serving " + msg[len("event=serving "):]
        record.msg, record.args = self.prefix + msg, ()
        return True


async def _serve(server: WorkerServer, conn) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    await server.start()
    s = server.settings.server
    from runtime.server.banner import serving_line
    conn.send_bytes(json.dumps({"event": "serving", "pid": os.getpid(), "line": serving_line(
        server.core, s.host, server.http_port, server.grpc_port)}).encode())
    reason = "signal"
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
        except asyncio.TimeoutError:
            if os.getppid() != parent:
                reason = "supervisor_gone"
                break
    log.info("event=stopping reason=%s", reason)
    await server.stop()


def main(settings_wire: str, worker: int, run_dir: str, http_port: int, grpc_port: int,
         log_format: str, conn, replacement: bool = False) -> None:
    """Spawn target: the supervisor's own settings (as JSON: nothing is parsed or read
    again), the ports it probed, then serve until told to stop. Exit status 0 after a
    clean drain."""
    from runtime.config.settings import Settings
    from runtime.logs import setup_logging

    # The supervisor handles Ctrl-C (the terminal sends SIGINT to the whole group):
    # ignore it until our own handler is installed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings.from_wire(settings_wire)
    settings.server.http_port, settings.server.grpc_port = http_port, grpc_port
    setup_logging(settings.log_level, log_format)
    for h in logging.getLogger("splitserve").handlers:
        h.addFilter(_Tag(worker))
    code = 0
    try:
        from runtime.server import loops
        loops.run(_serve(WorkerServer(settings, worker, Path(run_dir), replacement), conn),
                  settings.server.loop)
    except Exception as e:  # noqa: BLE001  the supervisor restarts us, with backoff
        log.error("event=worker_failed error=%r", f"{type(e).__name__}: {e}")
        log.debug("traceback", exc_info=e)
        code = 1
    logging.shutdown()
    # os._exit: a failed start can leave gRPC's non-daemon threads behind, which would
    # keep the process (and its slot) alive forever.
    os._exit(code)
