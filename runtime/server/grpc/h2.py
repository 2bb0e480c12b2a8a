"""gRPC over splitserve's own HTTP/2 connection (runtime/server/grpc/h2conn.py), on the Core's
event loop: `server.grpc_transport: h2` (the default).

The same servicers as rpc.py (rpc.InferenceServicer, RoutingServicer, the grpc.aio
health and reflection servicers) run unchanged, found through the handlers grpcio's
generated `add_*_to_server` functions register, so there is one behaviour and three
transports (this, grpc.aio, grpcio's thread pool). What a call costs here is parsing a
few frames and one write; with grpc.aio it is several wake-ups of the loop from gRPC's
poller thread per call (bench/RESULTS_HOTPATH.md).

The gRPC wire rules kept: length-prefixed messages, identity/gzip/deflate request
compression, `grpc-timeout` deadlines, metadata (`-bin` values base64), status and
percent-encoded message in trailers (trailers-only for an error before any response),
UNIMPLEMENTED for an unknown method, HTTP 415 for a request that is not gRPC, RST_STREAM
cancelling the handler. Bounds: `limits.max_body_bytes` per message, checked against the
declared length before a byte is buffered and against the inflated size while inflating
(never past the bound); `server.grpc_limits` (h2conn.py) for the rest, and
`max_connections` per process here. A malformed request is answered with a gRPC status
and one DEBUG line: a client cannot make the server log per request.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import socket
import time
import zlib

import grpc
from grpc_health.v1 import health_pb2

from runtime.service.core import Core
from runtime.server.grpc import h2conn
from runtime.server.grpc import servicers as rpc
from runtime.server.grpc.h2conn import H2Connection, Stream, encode_headers

log = logging.getLogger("splitserve.grpc")

_RESERVED = frozenset(("te", "content-type", "grpc-timeout", "grpc-encoding",
                       "grpc-accept-encoding"))
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_WBITS = {"gzip": 31, "deflate": 15}  # gRPC's "deflate" is the zlib format
_ACCEPT = (("grpc-accept-encoding", "identity,deflate,gzip"),)
_END = object()


class Registry:
    """Collects what grpcio's generated `add_*_to_server(servicer, server)` register: the
    method handlers by path ("/package.Service/Method")."""

    def __init__(self):
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list = []
        self._unknown: set[str] = set()  # paths no handler serves, bounded

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, h in handlers.items():
            self._handlers[f"/{service}/{name}"] = h

    def add_generic_rpc_handlers(self, generic) -> None:
        self._generic.extend(generic)

    def lookup(self, path: str) -> grpc.RpcMethodHandler | None:
        """A found handler is kept (they are few); an unknown path only in a small set of
        short paths, so 4,096 made-up paths cost no memory to speak of."""
        h = self._handlers.get(path)
        if h is None and path not in self._unknown:
            for g in self._generic:
                h = g.service(_Details(path))
                if h is not None:
                    self._handlers[path] = h
                    return h
            if len(path) <= 256:
                if len(self._unknown) >= 256:
                    self._unknown.clear()
                self._unknown.add(path)
        return h


class _Details:
    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str):
        self.method = method
        self.invocation_metadata = ()


def _status_value(code) -> int:
    return code.value[0] if isinstance(code, grpc.StatusCode) else int(code)


def _percent(message: str) -> bytes:
    """grpc-message: UTF-8, bytes outside printable ASCII and '%' percent-encoded."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def _metadata_out(md) -> list[tuple]:
    out = []
    for k, v in md:
        if k.endswith("-bin"):
            v = base64.b64encode(v if isinstance(v, bytes) else v.encode()).rstrip(b"=")
        elif not isinstance(v, (str, bytes)):
            v = str(v)
        out.append((k.lower(), v))
    return out


_STATUS = [str(i).encode() for i in range(17)]


def _timeout(value: str) -> float | None:
    if len(value) < 2 or value[-1] not in _UNITS or not value[:-1].isdigit() or len(value) > 9:
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def _read_headers(headers) -> tuple:
    """(method, path, content-type, grpc-timeout, grpc-encoding, metadata): metadata None
    when a -bin value does not decode, a str (why) when a header name is malformed (empty
    or upper case, RFC 9113 8.2.1)."""
    method = path = ctype = None
    timeout = encoding = ""
    md = []
    for k, v in headers:
        if not k or k != k.lower():
            return None, None, None, "", "", f"malformed header name {k[:64]!r}"
        if k[0] == ":":
            if k == ":path":
                path = v
            elif k == ":method":
                method = v
        elif k == "content-type":
            ctype = v
        elif k == "grpc-timeout":
            timeout = v
        elif k == "grpc-encoding":
            encoding = v
        elif k not in _RESERVED:
            if k.endswith("-bin"):
                try:
                    v = base64.b64decode(v + "=" * (-len(v) % 4), validate=True)
                except ValueError:
                    return method, path, ctype, timeout, encoding, None
            md.append((k, v))
    return method, path, ctype, timeout, encoding, tuple(md)


class Context:
    """The part of grpc.aio's ServicerContext the servicers use."""

    __slots__ = ("_call", "_md", "_code", "_details", "_trailing", "_deadline", "_headers_sent")

    def __init__(self, call: _Call, md: tuple, deadline: float | None):
        self._call = call
        self._md = md
        self._code = None
        self._details = ""
        self._trailing = ()
        self._deadline = deadline
        self._headers_sent = False

    def invocation_metadata(self):
        return self._md

    def peer(self) -> str:
        return self._call.stream.conn.peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code, details: str = "", trailing_metadata=()):
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details or ""
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_trailing_metadata(self, md) -> None:
        self._trailing = tuple(md)

    def trailing_metadata(self):
        return self._trailing

    async def send_initial_metadata(self, md) -> None:
        if self._headers_sent:
            raise RuntimeError("initial metadata was already sent")
        self._call.send_headers(md)

    async def write(self, message) -> None:
        await self._call.write(message)

    async def read(self):
        return await self._call.read()

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.finished

    def auth_context(self) -> dict:
        return {}

    def set_compression(self, compression) -> None:  # responses stay uncompressed
        pass

    def disable_next_message_compression(self) -> None:
        pass


class _Call:
    """One RPC on one stream: request bytes in, the handler run as a task, the answer out."""

    __slots__ = ("server", "stream", "handler", "ctx", "task", "buf", "queue", "cancelled",
                 "finished", "expired", "timer", "encoding", "unary_in")

    def __init__(self, server: H2GrpcServer, stream: Stream, handler, md: tuple,
                 deadline: float | None, encoding: str):
        self.server = server
        self.stream = stream
        self.handler = handler
        self.ctx = Context(self, md, deadline)
        self.task: asyncio.Task | None = None
        self.buf = bytearray()
        self.unary_in = not handler.request_streaming
        self.queue: asyncio.Queue | None = None if self.unary_in else asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.expired = False
        self.timer = None
        self.encoding = encoding
        stream.on_data = self._data
        stream.on_reset = self._reset
        stream.on_body_timeout = self._body_timeout
        if deadline is not None:
            self.timer = server.loop.call_at(server.loop.time() + (deadline - time.monotonic()),
                                             self._expire)

    # ---- request side -----------------------------------------------------------------
    def _data(self, data: bytes, end: bool) -> None:
        if self.finished or self.buf is None:
            return
        if data:
            self.buf += data
        if self.unary_in:
            buf = self.buf
            if len(buf) >= 5:  # the declared length, before the message is buffered
                n = int.from_bytes(buf[1:5], "big")
                if n > self.server.max_message:
                    self._too_large(n)
                    return
                if len(buf) > n + 5:
                    self._fail(grpc.StatusCode.INTERNAL, "expected exactly one request message")
                    return
            self.stream.consumed(len(data))
            if end:
                self._start_unary()
            return
        self._split_messages()
        if end and not self.finished:
            if self.buf:
                self._fail(grpc.StatusCode.INTERNAL, "stream ended inside a message")
                return
            self.queue.put_nowait(_END)

    def _split_messages(self) -> None:
        buf = self.buf
        while len(buf) >= 5:
            n = int.from_bytes(buf[1:5], "big")
            if n > self.server.max_message:
                self._too_large(n)
                return
            if len(buf) < 5 + n:
                break
            msg = self._message(bytes(buf[:5 + n]))
            del buf[:5 + n]
            if msg is None:
                return
            self.queue.put_nowait((msg, 5 + n))

    def _message(self, framed: bytes):
        """One length-prefixed message -> the request object (None: failed and answered)."""
        payload = framed[5:]
        if framed[0] == 1:
            wbits = _WBITS.get(self.encoding)
            if wbits is None:
                self._fail(grpc.StatusCode.UNIMPLEMENTED,
                           f"message compressed with {self.encoding or 'no grpc-encoding'}; "
                           f"this server accepts identity, deflate, gzip")
                return None
            limit = self.server.max_message
            d = zlib.decompressobj(wbits)
            try:  # never more than one byte past the bound, whatever the ratio
                payload = d.decompress(payload, limit + 1)
            except zlib.error:
                self._fail(grpc.StatusCode.INTERNAL, "could not decompress the request message")
                return None
            if len(payload) > limit:
                self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Received message larger than max (over {limit} bytes inflated)")
                return None
            if not d.eof:
                self._fail(grpc.StatusCode.INTERNAL, "could not decompress the request message")
                return None
        elif framed[0] != 0:
            self._fail(grpc.StatusCode.INTERNAL, "bad message compression flag")
            return None
        try:
            return self.handler.request_deserializer(payload) \
                if self.handler.request_deserializer else payload
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            self._fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return None

    def _too_large(self, n: int) -> None:
        self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"Received message larger than max ({n} vs. {self.server.max_message})")

    def _start_unary(self) -> None:
        buf = self.buf
        if len(buf) < 5 or int.from_bytes(buf[1:5], "big") != len(buf) - 5:
            self._fail(grpc.StatusCode.INTERNAL, "expected exactly one request message")
            return
        request = self._message(bytes(buf))
        self.buf = None
        if request is not None:
            self.task = self.server.loop.create_task(self._run(request))

    def start_streaming(self) -> None:
        self.task = self.server.loop.create_task(self._run(self._requests()))

    async def _requests(self):
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            msg, size = item
            self.stream.consumed(size)
            yield msg

    async def read(self):
        if self.unary_in:
            raise RuntimeError("read() is for request-streaming methods")
        item = await self.queue.get()
        if item is _END:
            return grpc.aio.EOF
        self.stream.consumed(item[1])
        return item[0]

    # ---- running and answering ----------------------------------------------------------
    async def _run(self, arg) -> None:
        h = self.handler
        ctx = self.ctx
        fn = (h.unary_unary or h.unary_stream) if self.unary_in else (h.stream_unary or h.stream_stream)
        streaming_out = h.response_streaming
        try:
            result = fn(arg, ctx)
            if streaming_out:
                if inspect.isasyncgen(result):
                    async for r in result:
                        await self.write(r)
                else:
                    await result
                self._end(grpc.StatusCode.OK if ctx._code is None else ctx._code, ctx._details)
                return
            response = await result
        except grpc.aio.AbortError:
            self._end(ctx._code, ctx._details)
            return
        except asyncio.CancelledError:
            if self.expired:
                self._end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            return
        except ConnectionResetError:
            return
        except Exception as e:  # noqa: BLE001 - a bug in a handler: UNKNOWN, as grpcio
            log.error("event=grpc_handler_error method=%s error=%r", self._path(), e)
            log.debug("traceback", exc_info=e)
            self._end(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}")
            return
        finally:
            if self.timer is not None:
                self.timer.cancel()
        if ctx._code is not None and ctx._code != grpc.StatusCode.OK:
            self._end(ctx._code, ctx._details)
            return
        try:
            payload = h.response_serializer(response) if h.response_serializer else response
        except Exception as e:  # noqa: BLE001
            log.error("event=grpc_serialize_error method=%s error=%r", self._path(), e)
            self._end(grpc.StatusCode.INTERNAL, "Failed to serialize response!")
            return
        framed = b"\x00" + len(payload).to_bytes(4, "big") + payload
        headers = None if ctx._headers_sent else self._headers_block(())
        ctx._headers_sent = True
        trailers = self._trailers_block(0, "")
        self.finished = True
        if not self.stream.try_send(framed, trailers, headers):
            try:
                if headers is not None:
                    self.stream.send_headers(headers)
                await self.stream.send_data(framed)
            except ConnectionResetError:
                return
            self.stream.send_headers(trailers, end_stream=True)

    def _path(self) -> str:
        for k, v in self.stream.headers:
            if k == ":path":
                return v
        return "?"

    def _headers_block(self, md) -> bytes:
        if not md:
            return self.server.headers_block
        extra = self.server.initial_metadata + tuple(md)
        return h2conn.STATUS_200_GRPC + encode_headers(_ACCEPT + tuple(_metadata_out(extra)))

    def _trailers_block(self, status: int, message: str) -> bytes:
        fields = [(b"grpc-status", _STATUS[status] if status < 17 else str(status).encode())]
        if message:
            fields.append((b"grpc-message", _percent(message)))
        trailing = self.ctx._trailing
        if trailing:
            fields += _metadata_out(trailing)
        return encode_headers(fields)

    def send_headers(self, md) -> None:
        self.ctx._headers_sent = True
        self.stream.send_headers(self._headers_block(md))

    async def write(self, message) -> None:
        if self.finished or self.stream.reset:
            raise ConnectionResetError("the call is over")
        if not self.ctx._headers_sent:
            self.send_headers(())
        payload = self.handler.response_serializer(message) if self.handler.response_serializer else message
        await self.stream.send_data(b"\x00" + len(payload).to_bytes(4, "big") + payload)

    def _end(self, code, message: str) -> None:
        """The status, in trailers (or trailers-only when nothing was sent yet)."""
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        status = _status_value(code) if code is not None else 0
        if self.stream.reset:
            return
        trailers = self._trailers_block(status, message)
        if not self.ctx._headers_sent:
            self.ctx._headers_sent = True
            trailers = self._headers_block(()) + trailers
        self.stream.send_headers(trailers, end_stream=True)

    def _fail(self, code, message: str) -> None:
        """An error before or beside the handler: answer now, stop the handler."""
        self._end(code, message)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _expire(self) -> None:
        self.expired = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        else:
            self._end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _body_timeout(self) -> None:
        """The request body did not arrive within `grpc_limits.body_s`."""
        self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "request body not received in time")

    def _reset(self) -> None:
        self.cancelled = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _Refused(asyncio.Protocol):
    """A connection over `max_connections`: SETTINGS, GOAWAY (last stream 0: nothing was
    processed, a client may retry elsewhere), closed; nothing it sends is read."""

    _last = [0.0, 0]  # last WARNING, refused since: one line per 10 s, not per connection

    def connection_made(self, transport) -> None:
        now, last = time.monotonic(), self._last
        last[1] += 1
        if now - last[0] >= 10.0:
            log.warning("event=h2_connection_refused reason=max_connections refused_since_last=%d", last[1])
            last[0], last[1] = now, 0
        transport.write(h2conn.frame(h2conn.SETTINGS, 0, 0) + h2conn.frame(
            h2conn.GOAWAY, 0, 0, bytes(4) + h2conn.NO_ERROR.to_bytes(4, "big") + b"max_connections"))
        transport.close()


class H2GrpcServer:
    """The listener, its connections and the method table; `stop()` reports NOT_SERVING,
    sends GOAWAY, lets streams in flight finish within `grace`, then closes."""

    def __init__(self, registry: Registry, health_servicer, max_message: int,
                 initial_metadata: tuple = (), limits=None):
        if limits is None:
            from runtime.config.settings import GrpcLimits
            limits = GrpcLimits()
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.registry = registry
        self.health = health_servicer
        self.max_message = max_message
        self.initial_metadata = tuple(initial_metadata)
        self._conns: set[H2Connection] = set()
        self.headers_block = h2conn.STATUS_200_GRPC + encode_headers(
            _ACCEPT + tuple(_metadata_out(self.initial_metadata)))
        self._servers: list[asyncio.AbstractServer] = []

    def _protocol(self) -> asyncio.Protocol:
        if len(self._conns) >= self.limits.max_connections:
            return _Refused()
        conn = H2Connection(self._stream, on_close=self._conns.discard, limits=self.limits)
        self._conns.add(conn)
        return conn

    def _stream(self, stream: Stream, end: bool) -> None:
        headers = stream.headers
        parsed = getattr(headers, "parsed", None)
        if parsed is None:
            parsed = _read_headers(headers)
            if isinstance(headers, h2conn.Headers):
                headers.parsed = parsed
        method, path, ctype, timeout, encoding, md = parsed
        if md.__class__ is not tuple:
            why = md or "a -bin metadata value is not base64"
            log.debug("event=grpc_malformed_request peer=%s stream=%d error=%r",
                      stream.conn.peer, stream.id, why)
            self._trailers_only(stream, grpc.StatusCode.INTERNAL, why)
            return
        if ctype is None or not ctype.startswith("application/grpc"):
            stream.send_headers(encode_headers([(b":status", b"415"),
                                                (b"content-type", b"text/plain")]) , end_stream=True)
            return
        if method != "POST":
            self._trailers_only(stream, grpc.StatusCode.UNIMPLEMENTED, f"method {method} is not POST")
            return
        handler = self.registry.lookup(path or "")
        if handler is None:
            self._trailers_only(stream, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        deadline = None
        if timeout:
            t = _timeout(timeout)
            if t is None:
                self._trailers_only(stream, grpc.StatusCode.INTERNAL, f"bad grpc-timeout {timeout!r}")
                return
            deadline = time.monotonic() + t
        call = _Call(self, stream, handler, md, deadline, encoding)
        if handler.request_streaming:
            stream.streaming = True
            call.start_streaming()
        if end:
            call._data(b"", True)

    def _trailers_only(self, stream: Stream, code, message: str) -> None:
        # the same response headers as a call's own trailers-only answer (_Call._end)
        stream.send_headers(self.headers_block + encode_headers(
            [(b"grpc-status", str(_status_value(code)).encode()), (b"grpc-message", _percent(message))]),
            end_stream=True)

    async def start(self, host: str, port: int, reuse_port: bool) -> int:
        """Listen on every address `host` resolves to, all on one port (with port 0 the
        first address picks it: `localhost` is ::1 and 127.0.0.1 on the same port)."""
        try:
            infos = await self.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            addrs = list(dict.fromkeys(info[4][0] for info in infos))
            for addr in addrs:
                self._servers.append(await self.loop.create_server(
                    self._protocol, host=addr, port=port, reuse_address=True,
                    reuse_port=reuse_port or None, backlog=2048))
                port = self._servers[0].sockets[0].getsockname()[1]
        except OSError as e:
            for srv in self._servers:
                srv.close()
            self._servers = []
            raise OSError(e.errno, f"gRPC could not bind {host}:{port}: {e.strerror}") from None
        return port

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        for srv in self._servers:
            srv.close()
        conns = list(self._conns)
        for c in conns:
            c.go_away()
        waits = [c.wait_idle() for c in conns]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), grace)
            except TimeoutError:
                pass
        for c in list(self._conns):
            c.close()
        for srv in self._servers:
            await srv.wait_closed()


async def start(core: Core, host: str, port: int, reuse_port: bool = False,
                initial_metadata: tuple = ()) -> tuple[H2GrpcServer, int]:
    """Build, bind and start; returns (server, bound port). `initial_metadata` goes out
    with every response's headers (x-worker under `--workers`)."""
    registry = Registry()
    health_servicer = rpc._HealthServicer(core)
    rpc.add_services(registry, rpc.InferenceServicer(core), rpc.RoutingServicer(core),
                     health_servicer, aio=True)
    for name in rpc.HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server = H2GrpcServer(registry, health_servicer, core.settings.limits.max_body_bytes,
                          initial_metadata, core.settings.server.grpc_limits)
    return server, await server.start(host, port, reuse_port)

