"""The gRPC front end on its own thread pool (`server.grpc_threads` > 0).

grpc.aio drives every call through the event loop: each RPC is several wake-ups of the
loop from gRPC's completion-queue poller, and that is most of a small request's CPU on
the loop (bench/RESULTS_HOTPATH.md: the profile). Here gRPC's C core does the transport
on its own threads (without the GIL) and a pool of `grpc_threads` handler threads parse
and serialize the messages; each call crosses to the event loop once, where the same
servicers as rpc.py (rpc.InferenceServicer, ...) run unchanged: one behaviour, two
transports. A thread waits (GIL released) while its call runs on the loop, so at most
`grpc_threads` calls are in the core at once; requests beyond wait in gRPC's queue.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2

from runtime.core import Core
from runtime.server import rpc


class _Context:
    """A sync ServicerContext seen through the grpc.aio API the servicers use (their
    `await context.abort(...)` runs on the loop; the abort state lives on the context,
    so the handler thread's server answers with it)."""

    __slots__ = ("_c",)

    def __init__(self, context):
        self._c = context

    async def abort(self, code, details="", trailing_metadata=()):
        if trailing_metadata:
            self._c.set_trailing_metadata(trailing_metadata)
        try:
            self._c.abort(code, details)  # records the status, raises a bare Exception
        except Exception:  # noqa: BLE001
            raise grpc.aio.AbortError() from None  # what rpc._guarded lets through

    async def send_initial_metadata(self, metadata):
        self._c.send_initial_metadata(metadata)

    def __getattr__(self, name):
        return getattr(self._c, name)


class _Bridge:
    """A sync servicer whose methods run the async servicer's methods on `loop`."""

    def __init__(self, servicer, loop: asyncio.AbstractEventLoop):
        for name, fn in inspect.getmembers(servicer, inspect.ismethod):
            if name.startswith("_"):
                continue
            if inspect.isasyncgenfunction(fn):
                setattr(self, name, self._streaming(fn, loop))
            elif inspect.iscoroutinefunction(fn):
                setattr(self, name, self._unary(fn, loop))
            else:
                setattr(self, name, fn)

    @staticmethod
    def _unary(fn, loop):
        run = asyncio.run_coroutine_threadsafe

        def call(request, context):
            return run(fn(request, _Context(context)), loop).result()
        return call

    @staticmethod
    def _streaming(fn, loop):
        def call(request_iterator, context):
            end = object()

            async def requests():
                while (r := await loop.run_in_executor(None, next, request_iterator, end)) is not end:
                    yield r

            responses = fn(requests(), _Context(context))
            try:
                while True:
                    try:
                        yield asyncio.run_coroutine_threadsafe(responses.__anext__(), loop).result()
                    except StopAsyncIteration:
                        return
            finally:
                asyncio.run_coroutine_threadsafe(responses.aclose(), loop).result()
        return call


class _Health(health.HealthServicer):
    """grpc.health.v1: SERVING while the core is ready; NOT_SERVING once stopping."""

    def __init__(self, core: Core):
        super().__init__()
        self.core = core

    def Check(self, request, context):
        override = rpc.health_override(self.core, self._server_status, request)
        return override if override is not None else super().Check(request, context)


class ThreadedServer:
    """What app.py stops: NOT_SERVING first, then stop accepting, `grace` for in-flight."""

    def __init__(self, server: grpc.Server, health_servicer: _Health, pool: ThreadPoolExecutor):
        self.server = server
        self.health = health_servicer
        self.pool = pool

    async def stop(self, grace: float | None) -> None:
        self.health.enter_graceful_shutdown()
        done = self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        self.pool.shutdown(wait=False)


async def start(core: Core, host: str, port: int, reuse_port: bool = False,
                interceptors: tuple = (), threads: int = 4) -> tuple[ThreadedServer, int]:
    """Build, bind and start the threaded gRPC server (sync `interceptors`); returns
    (server, bound port)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="grpc")
    server = grpc.server(pool, options=rpc.options(core, reuse_port),
                         interceptors=interceptors or None)
    health_servicer = _Health(core)
    rpc.add_services(server, _Bridge(rpc.InferenceServicer(core), loop),
                     _Bridge(rpc.RoutingServicer(core), loop), health_servicer)
    for name in rpc.HEALTH_SERVICES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = rpc.bind(server, host, port)
    server.start()
    return ThreadedServer(server, health_servicer, pool), bound
