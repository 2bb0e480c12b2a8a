"""gRPC front end: KServe v2 / Triton `inference.GRPCInferenceService`, splitserve's
`splitserve.management.v1.RoutingService`, grpc.health.v1 and server reflection, on one
grpc.aio server sharing the Core's event loop.

Thin, like the REST twin (rest_v2.py): decode with `runtime.protocol.kserve_grpc`, call
the core, encode. `ServingError` codes become gRPC status codes through the one table
below, with the core's message as details. The infer path does no JSON and no
per-element Python work.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime import __version__

from runtime.service import metadata
from runtime.service.core import Core
from runtime.service.inference import new_request_id
from runtime.errors import Code, ServingError
from runtime.protocol import kserve_grpc as codec
from runtime.protocol.kserve_grpc import parse_version as _version
from runtime.protocol.pb import POOL
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from runtime.protocol.pb import splitserve_management_pb2 as mpb
from runtime.protocol.pb import splitserve_management_pb2_grpc as mpb_grpc
from runtime.server.rest.v2 import EXTENSIONS, SERVER_NAME

log = logging.getLogger("splitserve.grpc")

GRPC_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.CLIENT_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

INFERENCE_SERVICE = "inference.GRPCInferenceService"
ROUTING_SERVICE = "splitserve.management.v1.RoutingService"
SHM_UNSUPPORTED = ("shared memory is not supported by splitserve; send tensors in "
                   "raw_input_contents")
HEALTH_SERVICES = ("", INFERENCE_SERVICE, ROUTING_SERVICE)  # what grpc.health.v1 reports on
STREAM_WINDOW = 64  # requests one ModelStreamInfer stream may have in flight


def _guarded(method):
    """The one error handler of a unary servicer method: ServingError -> its status code
    and message (with x-request-id / x-model-version trailing metadata when known); any
    other exception is a bug: INTERNAL with a one-line message, traceback at debug."""
    @functools.wraps(method)
    async def call(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as e:
            await context.abort(GRPC_STATUS[e.code], e.message, _attribution(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # noqa: BLE001
            log.error("event=grpc_internal_error method=%s error=%r", method.__name__, e)
            log.debug("traceback", exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    return call


def _attribution(e: ServingError) -> tuple:
    md = []
    if e.request_id:
        md.append(("x-request-id", e.request_id))
    if e.version is not None:
        md.append(("x-model-version", str(e.version)))
    return tuple(md)


class _Metadata:
    """Invocation metadata as the read-only mapping the inference core reads the sticky
    key from, built only when something looks (most models have no sticky header)."""

    __slots__ = ("_context", "_d")

    def __init__(self, context):
        self._context = context
        self._d = None

    def _dict(self) -> dict:
        if self._d is None:
            self._d = {k: v for k, v in (self._context.invocation_metadata() or ())}
        return self._d

    def get(self, key, default=None):
        return self._dict().get(key, default)

    def items(self):
        return self._dict().items()

    def __getitem__(self, key):
        return self._dict()[key]

    def __contains__(self, key):
        return key in self._dict()


def _authorize(core: Core, context, action: str) -> None:
    core.control.authorize(_Metadata(context).get("authorization"), action)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Triton's GRPCInferenceService over the Core. Runs on the event loop."""

    def __init__(self, core: Core):
        self.core = core
        self.max_elements = core.settings.limits.max_elements

    # ---- health and metadata ------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready())

    @_guarded
    async def ModelReady(self, request, context):
        # Like Triton: an unknown model or version is "not ready", not an error.
        v = _version(request.version)
        try:
            ok = self.core.control.ready(request.name, v)
        except ServingError as e:
            if e.code is Code.NOT_FOUND:
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=EXTENSIONS)

    @_guarded
    async def ModelMetadata(self, request, context):
        meta = metadata.model_metadata(self.core.manager.view(), request.name,
                                       _version(request.version))
        return codec.model_metadata(meta)

    @_guarded
    async def ModelConfig(self, request, context):
        cfg = metadata.model_config(self.core.manager.view(), request.name,
                                    _version(request.version))
        return codec.model_config(cfg)

    @_guarded
    async def ModelStatistics(self, request, context):
        stats = self.core.metrics.statistics(request.name or None, _version(request.version))
        return codec.model_statistics(stats)

    # ---- inference ----------------------------------------------------------------
    @_guarded
    async def ModelInfer(self, request, context):
        try:
            req = codec.decode_infer(request, self.max_elements)
        except ServingError as e:
            e.request_id = e.request_id or request.id or None
            raise
        req.headers = _Metadata(context)
        resp = await self.core.inference.infer(req)
        out = codec.encode_infer(resp)
        context.set_trailing_metadata((("x-model-version", out.model_version),
                                       ("x-route", resp.route), ("x-request-id", out.id)))
        return out

    async def _stream_one(self, request, md: _Metadata) -> pb.ModelStreamInferResponse:
        core = self.core
        req = None
        try:
            req = codec.decode_infer(request, self.max_elements)
            req.headers = md
            if req.id is None:  # the stream's x-request-id names the stream, not each message
                req.id = new_request_id()
            resp = await core.inference.infer(req)
            out = codec.encode_infer(resp)
        except ServingError as e:
            return pb.ModelStreamInferResponse(
                error_message=e.message,
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version,
                    id=(req.id if req is not None else request.id) or ""))
        except Exception as e:
            log.error("event=grpc_stream_infer_error model=%s error=%r", request.model_name, e)
            log.debug("traceback", exc_info=e)
            return pb.ModelStreamInferResponse(error_message=f"internal error: {type(e).__name__}: {e}")
        if req.parameters.get("triton_enable_empty_final_response"):
            # Not decoupled: this one response is also the final one.
            out.parameters["triton_final_response"].bool_param = True
        return pb.ModelStreamInferResponse(infer_response=out)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request answered on the stream in the order sent; requests run
        concurrently (up to STREAM_WINDOW); an error answers that request only."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue = asyncio.Queue(STREAM_WINDOW)
        md = _Metadata(context)

        async def read():
            try:
                async for request in request_iterator:
                    await pending.put(loop.create_task(self._stream_one(request, md)))
            finally:
                await pending.put(None)  # end of requests (or a read error, raised below)

        reader = loop.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # re-raises what ended the reading, if anything did
        finally:
            reader.cancel()
            while not pending.empty():
                t = pending.get_nowait()
                if t is not None:
                    t.cancel()

    # ---- repository -----------------------------------------------------------------
    @_guarded
    async def RepositoryIndex(self, request, context):
        return codec.repository_index(metadata.repository_index(
            self.core.manager.view(), self.core.root, request.ready))

    @_guarded
    async def RepositoryModelLoad(self, request, context):
        _authorize(self.core, context, f"load model={request.model_name}")
        _no_load_parameters(request)
        await self.core.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_guarded
    async def RepositoryModelUnload(self, request, context):
        _authorize(self.core, context, f"unload model={request.model_name}")
        await self.core.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- shared memory: not supported (Triton answers UNIMPLEMENTED = UNSUPPORTED) ---
    async def SystemSharedMemoryStatus(self, request, context):
        if request.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no shared memory region "
                                f"'{request.name}': {SHM_UNSUPPORTED}")
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHM_UNSUPPORTED)

    async def SystemSharedMemoryUnregister(self, request, context):
        return pb.SystemSharedMemoryUnregisterResponse()  # nothing is ever registered

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no CUDA shared memory region "
                                f"'{request.name}': {SHM_UNSUPPORTED}")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHM_UNSUPPORTED)

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- trace and log settings: nothing to read, nothing to change --------------------
    async def TraceSetting(self, request, context):
        if request.settings:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "splitserve has no request "
                                "tracing; trace settings cannot be changed")
        return pb.TraceSettingResponse()

    async def LogSettings(self, request, context):
        if request.settings:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "log settings cannot be changed "
                                "over gRPC; use the --log-level flag or the config file")
        return pb.LogSettingsResponse()


def _no_load_parameters(request) -> None:
    """Triton's load parameters (config override, file:...) would change what loads; we
    load what the repository holds, so refuse them rather than ignore them."""
    if request.parameters:
        raise ServingError(Code.INVALID_ARGUMENT, f"load parameters are not supported "
                           f"(got {', '.join(sorted(request.parameters))}); splitserve loads "
                           f"the model as its repository folder describes it")


def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


class RoutingServicer(mpb_grpc.RoutingServiceServicer):
    """splitserve.management.v1.RoutingService: routing as JSON text, one schema with REST."""

    def __init__(self, core: Core):
        self.core = core

    @_guarded
    async def GetRouting(self, request, context):
        state = self.core.control.routing(request.model)
        return mpb.RoutingState(model=request.model, state_json=json.dumps(state, default=_jsonable))

    @_guarded
    async def SetRouting(self, request, context):
        _authorize(self.core, context, f"put_routing model={request.model}")
        try:
            obj = json.loads(request.config_json) if request.config_json.strip() else None
        except ValueError as e:
            raise ServingError(Code.INVALID_ARGUMENT, f"config_json is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ServingError(Code.INVALID_ARGUMENT, "config_json must be a JSON object")
        state = await self.core.control.put_routing(request.model, obj)
        return mpb.RoutingState(model=request.model, state_json=json.dumps(state, default=_jsonable))


NOT_SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)


def health_override(core: Core, known, request) -> health_pb2.HealthCheckResponse | None:
    """The one rule of both health servicers (grpc.aio here, h2 in h2.py): a
    service we registered (`known`: the servicer's status table) is NOT_SERVING while the
    core is not ready (stopping), whatever the table says; None: the table answers
    (SERVING, or NOT_FOUND for a service we never registered)."""
    if not core.ready() and request.service in known:
        return NOT_SERVING
    return None


class _HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1: SERVING while the core is ready; NOT_SERVING once stopping."""

    def __init__(self, core: Core):
        super().__init__()
        self.core = core

    async def Check(self, request, context):
        override = health_override(self.core, self._server_status, request)
        return override if override is not None else await super().Check(request, context)


class _ChainedPool:
    """Reflection looks symbols up in our POOL first, then in protobuf's default pool
    (where grpc.health.v1 and the reflection service's own descriptors live)."""

    def __init__(self, *pools):
        self._pools = pools

    def __getattr__(self, name):
        def find(*args):
            err = None
            for p in self._pools:
                try:
                    return getattr(p, name)(*args)
                except KeyError as e:
                    err = e
            raise err
        return find


class GrpcServer:
    """The grpc.aio server plus its health servicer: `stop()` reports NOT_SERVING first,
    then stops accepting and gives in-flight calls `grace` seconds."""

    def __init__(self, server: grpc.aio.Server, health_servicer: _HealthServicer):
        self.server = server
        self.health = health_servicer

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def __getattr__(self, name):
        return getattr(self.server, name)


def options(core: Core, reuse_port: bool) -> list[tuple]:
    """grpc.aio's channel options: the message bound, and `server.grpc_limits` where
    grpcio has a knob for it (h2.py applies all of them itself)."""
    limits = core.settings.limits
    g = core.settings.server.grpc_limits
    out = [
        ("grpc.max_receive_message_length", limits.max_body_bytes),  # over: RESOURCE_EXHAUSTED
        ("grpc.max_send_message_length", -1),
        # one process: a taken port is an error, not a silent share
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_concurrent_streams", g.max_streams),
        ("grpc.max_metadata_size", g.max_header_list_bytes),
        ("grpc.server_handshake_timeout_ms", int(g.preface_s * 1000)),
        ("grpc.max_connection_idle_ms", int(g.idle_s * 1000)),
        # keepalive enforcement: a client may ping every 10 s, with or without calls
        # (channels kept warm); faster, twice, and it gets GOAWAY too_many_pings
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if g.max_age_s:
        out += [("grpc.max_connection_age_ms", int(g.max_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(g.max_age_grace_s * 1000))]
    return out


def add_services(server, inference, routing, health_servicer, aio: bool | None = None) -> None:
    """The four services on one server (aio, threaded, or rpc_h2's registry): ours,
    health, reflection. `aio`: the reflection servicer for an event loop (default: when
    `server` is a grpc.aio server)."""
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2_grpc
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    mpb_grpc.add_RoutingServiceServicer_to_server(routing, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (INFERENCE_SERVICE, ROUTING_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if aio is None:
        aio = isinstance(server, grpc.aio.Server)
    servicer = reflection.aio.ReflectionServicer if aio else reflection.ReflectionServicer
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        servicer(names, pool=_ChainedPool(POOL, descriptor_pool.Default())), server)


def bind(server, host: str, port: int) -> int:
    addr = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(addr)
    except RuntimeError as e:
        raise OSError(f"gRPC could not bind {addr}: address in use or not available") from None
    if not bound:
        raise OSError(f"gRPC could not bind {addr}")
    return bound


async def start(core: Core, host: str, port: int, reuse_port: bool = False,
                interceptors: tuple = ()) -> tuple[GrpcServer, int]:
    """Build, bind and start the gRPC server; returns (server, bound port). `reuse_port`:
    share the port with other worker processes (SO_REUSEPORT)."""
    server = grpc.aio.server(options=options(core, reuse_port), interceptors=interceptors or None,
                             maximum_concurrent_rpcs=core.settings.limits.max_inflight)
    health_servicer = _HealthServicer(core)
    add_services(server, InferenceServicer(core), RoutingServicer(core), health_servicer)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, serving)
    bound = bind(server, host, port)
    await server.start()
    return GrpcServer(server, health_servicer), bound
