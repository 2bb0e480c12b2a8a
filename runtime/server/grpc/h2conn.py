"""The server side of one HTTP/2 connection (RFC 9113), as much of it as gRPC uses, on
the event loop the Core runs on.

Why our own: grpc.aio wakes the loop several times per call from gRPC's poller thread,
and that hand-off is most of a small request's CPU (bench/RESULTS_HOTPATH.md). Frames
parsed here in `data_received` reach the handler without a thread hop, and a unary
answer (HEADERS, DATA, trailing HEADERS) leaves in one write.

What it does: the preface and SETTINGS exchange, PING, GOAWAY, RST_STREAM, HEADERS with
CONTINUATION and padding, flow control both ways (our windows reopen as the application
consumes; our sends wait for the peer's windows), a bound on concurrent streams, on
header-list size and on frame size. HPACK decoding is the `hpack` package's (Huffman,
dynamic table); a block that leaves the table unchanged decodes the same while the table
stays so, and such blocks (a client's every call after the first) are cached. Responses are
encoded with literals that never touch our encoder's dynamic table, so the peer's
SETTINGS_HEADER_TABLE_SIZE never matters. No server push, no TLS (an insecure port, as
before), no priorities (accepted and ignored, as RFC 9113 allows).

Hostile clients (issue 25; every bound is `server.grpc_limits`, `GrpcLimits`): frames that
cost us more than the sender (PING, SETTINGS, PRIORITY, empty or unknown frames, resets
received or provoked) spend per-connection budgets over a sliding window, and an empty
budget is GOAWAY ENHANCE_YOUR_CALM; reading pauses while our write buffer is over
`write_buffer_bytes`, so replies a client never reads cannot pile up, and at most
STREAMS_PER_PASS new streams are parsed per loop turn (a burst waits its turn); a header
block is refused by its length before HPACK sees it; both receive windows are enforced and
reopen only as the application consumes; one timer per connection closes it when the
preface, a request body, or the peer's reading is late, when it has been idle, or (with a
graceful GOAWAY first) when it reaches its maximum age.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections.abc import Callable

import hpack
from hpack.table import HeaderTable

log = logging.getLogger("splitserve.grpc")
_SETTING = struct.Struct(">HI")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAMS_PER_PASS = 32  # new streams parsed per loop turn: a burst on one connection waits its turn
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x2, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, \
    S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
MAX_FRAME = 1 << 20          # what we accept (advertised); the peer's default is 16 KiB
STREAM_WINDOW = 1 << 22      # each stream's receive window (4 MiB)
CONN_WINDOW = 1 << 24        # the connection's receive window (16 MiB)


class _CountingTable(HeaderTable):
    """hpack's dynamic table, counting every change (an insertion or an eviction): a
    decoded block may be reused only while the count it was decoded at still holds."""

    def __init__(self):
        super().__init__()
        self.changes = 0

    def add(self, name, value):
        self.changes += 1
        return super().add(name, value)

    def _shrink(self):
        self.changes += 1
        return super()._shrink()


class Headers(list):
    """A decoded header list; `parsed` is the application's reading of it, kept with a
    cached block so that a repeated block is also read once."""

    __slots__ = ("parsed",)

    def __init__(self, items=()):
        super().__init__(items)
        self.parsed = None


class ConnectionError_(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Budget:
    """At most `limit` events in any `window` seconds, near enough: this window's count
    plus the last window's, weighted by how much of it the sliding window still covers
    (two integers, no per-event history)."""

    __slots__ = ("limit", "window", "start", "cur", "prev")

    def __init__(self, limit: int, window: float, now: float):
        self.limit, self.window, self.start, self.cur, self.prev = limit, window, now, 0, 0

    def spend(self, now: float) -> bool:
        """Count one event; False once over the budget."""
        elapsed = now - self.start
        if elapsed >= self.window:
            self.prev = self.cur if elapsed < 2 * self.window else 0
            self.cur = 0
            self.start = now - elapsed % self.window
            elapsed = now - self.start
        self.cur += 1
        return self.cur + self.prev * (1.0 - elapsed / self.window) <= self.limit


_calm = [0.0, 0]  # last WARNING time, connections closed since: one line per 10 s, not per flood


def _log_calm(peer: str, why: str) -> None:
    now = time.monotonic()
    _calm[1] += 1
    if now - _calm[0] >= 10.0:
        log.warning("event=h2_enhance_your_calm peer=%s reason=%r closed_since_last=%d",
                    peer, why, _calm[1])
        _calm[0], _calm[1] = now, 0
    else:
        log.debug("event=h2_enhance_your_calm peer=%s reason=%r", peer, why)


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer (RFC 7541 5.1) with `first`'s high bits as the representation tag."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _str(s: bytes) -> bytes:
    n = len(s)
    return (bytes((n,)) if n < 127 else _int(n, 7, 0)) + s  # no Huffman


_NAMES: dict = {}  # name -> its encoded literal prefix (names are few and fixed)


def encode_headers(headers) -> bytes:
    """(name, value) pairs (str or bytes) -> an HPACK block of literals without indexing
    (new names): stateless, so it is valid whatever the peer's table size."""
    out = []
    names = _NAMES
    for name, value in headers:
        prefix = names.get(name)
        if prefix is None:
            prefix = b"\x00" + _str(name.encode("ascii") if isinstance(name, str) else name)
            if len(names) < 1024:
                names[name] = prefix
        out.append(prefix)
        out.append(_str(value.encode("utf-8") if isinstance(value, str) else value))
    return b"".join(out)


# ":status: 200" (static index 8) + "content-type: application/grpc" (static name 31)
STATUS_200_GRPC = b"\x88" + _int(31, 4, 0x00) + _str(b"application/grpc")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream_id.to_bytes(4, "big") + payload)


class Stream:
    """One request stream. The application sets `on_data(data: bytes, end: bool)` and
    `on_reset()` when it accepts the stream (and `on_body_timeout()`, else a late body
    resets it); `consumed(n)` reopens the receive windows. `streaming`: a request that
    may stay open (no `body_s` bound)."""

    __slots__ = ("id", "conn", "headers", "send_window", "closed_remote", "closed_local",
                 "reset", "on_data", "on_reset", "on_body_timeout", "streaming", "opened",
                 "recv_window", "held", "_unacked", "_waiter")

    def __init__(self, conn: H2Connection, stream_id: int, send_window: int):
        self.id = stream_id
        self.conn = conn
        self.headers: list[tuple[str, str]] = []
        self.send_window = send_window
        self.closed_remote = False
        self.closed_local = False
        self.reset = False
        self.on_data: Callable[[bytes, bool], None] | None = None
        self.on_reset: Callable[[], None] | None = None
        self.on_body_timeout: Callable[[], None] | None = None
        self.streaming = False
        self.opened = conn._epoch
        self.recv_window = STREAM_WINDOW
        self.held = 0       # received, counted against the connection window, not consumed
        self._unacked = 0  # received and consumed, not yet granted back
        self._waiter: asyncio.Future | None = None

    def consumed(self, n: int) -> None:
        """The application took n bytes off this stream: the connection's window gets them
        back (batched), the stream's once half of it is used (a unary request's stream
        ends before it matters)."""
        if n > self.held:
            n = self.held
        self.held -= n
        self.conn._credit(n)
        if self.closed_remote or self.reset:
            return
        self._unacked += n
        if self._unacked >= STREAM_WINDOW // 2:
            self.conn.write(frame(WINDOW_UPDATE, 0, self.id, self._unacked.to_bytes(4, "big")))
            self.recv_window += self._unacked
            self._unacked = 0

    # ---- sending --------------------------------------------------------------------
    def send_headers(self, block: bytes, end_stream: bool = False) -> None:
        self.conn.send_headers(self, block, end_stream)

    def try_send(self, payload: bytes, trailers: bytes | None = None,
                 headers: bytes | None = None) -> bool:
        """HEADERS, DATA and trailers ending the stream in one write if the windows allow:
        the unary fast path. False: nothing was sent; use `send_data`."""
        return self.conn.try_send(self, payload, trailers, headers)

    async def send_data(self, payload: bytes) -> None:
        await self.conn.send_data(self, payload)

    async def _wait_window(self) -> None:
        """Until the peer opens a window, at most `window_s`: a peer that never reads
        must not hold the handler (and its answer) forever."""
        if self.reset or self.conn.closed:
            raise ConnectionResetError("stream reset")
        conn = self.conn
        self._waiter = conn.loop.create_future()
        timer = conn.loop.call_later(conn.limits.window_s, self._wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            timer.cancel()
        if conn.loop.time() >= timer.when() and not self.reset:
            log.debug("event=h2_window_timeout peer=%s stream=%d", conn.peer, self.id)
            conn._rst(self, CANCEL)
            raise ConnectionResetError("the peer's window stayed closed")

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class H2Connection(asyncio.Protocol):
    """Frames in, streams out: `on_stream(stream, end_stream)` is called once a request's
    headers are complete; the callee answers through the Stream."""

    def __init__(self, on_stream: Callable[[Stream, bool], None], *, max_streams: int | None = None,
                 max_header_list: int | None = None,
                 on_close: Callable[[H2Connection], None] | None = None, limits=None):
        if limits is None:
            from runtime.config.settings import GrpcLimits
            limits = GrpcLimits()
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.on_stream = on_stream
        self.on_close = on_close
        self.max_streams = max_streams or limits.max_streams
        self.max_header_list = max_header_list or limits.max_header_list_bytes
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.closed = False
        self.going_away = False
        self._buf = bytearray()
        self._preface = False
        self._decoder = hpack.Decoder(max_header_list_size=self.max_header_list)
        self._table = self._decoder.header_table = _CountingTable()
        self._hcache: dict[bytes, tuple[int, list]] = {}
        self._streams: dict[int, Stream] = {}
        self._last_id = 0
        self._cont: tuple[int, int, bytearray] | None = None  # (stream id, flags, block) awaiting CONTINUATION
        self._cont_opened = 0
        self._peer_window = DEFAULT_WINDOW          # connection send window
        self._peer_initial = DEFAULT_WINDOW         # streams' initial send window
        self._peer_max_frame = 16_384
        self._recv_window = CONN_WINDOW             # what the peer may still send us
        self._recv_unacked = 0
        self._conn_waiters: list[Stream] = []
        self._idle: asyncio.Future | None = None
        self._lost = False
        # backpressure and housekeeping
        self._write_paused = False
        self._paused_at = 0.0
        self._opened = 0          # streams opened in this pass over the read buffer
        self._yielding = False    # parsing handed back to the loop until the next turn
        self._drain: asyncio.Future | None = None
        now = self.loop.time()
        self._made = self._idle_since = now
        self._active = False
        self._epoch = 0
        self._tick_s = max(0.05, min(limits.preface_s, limits.idle_s, limits.body_s,
                                     limits.window_s) / 4)
        self._body_ticks = int(limits.body_s / self._tick_s) + 1
        age = limits.max_age_s
        self._age_at = now + age * random.uniform(0.9, 1.1) if age else None
        self._aged = False
        self._timer: asyncio.TimerHandle | None = None
        w = limits.flood_window_s
        self._pings = Budget(limits.max_pings, w, now)
        self._settings_budget = Budget(limits.max_settings, w, now)
        self._priority = Budget(limits.max_priority, w, now)
        self._empty = Budget(limits.max_empty_frames, w, now)
        self._resets = Budget(limits.max_resets, w, now)

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = peer[0]
            self.peer = f"ipv6:[{host}]:{peer[1]}" if ":" in host else f"ipv4:{host}:{peer[1]}"
        try:
            transport.set_write_buffer_limits(high=self.limits.write_buffer_bytes)
        except (AttributeError, NotImplementedError):  # a transport without limits (tests)
            pass
        settings = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in (
            (S_MAX_CONCURRENT_STREAMS, self.max_streams), (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_FRAME_SIZE, MAX_FRAME), (S_MAX_HEADER_LIST_SIZE, self.max_header_list),
            (S_ENABLE_PUSH, 0)))
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, (CONN_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))
        self._timer = self.loop.call_later(self._tick_s, self._tick)

    def connection_lost(self, exc) -> None:
        if self._lost:
            return
        self._lost = True
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for s in list(self._streams.values()):
            self._reset_stream(s)
        self._streams.clear()
        for s in self._conn_waiters:
            s._wake()
        self._conn_waiters.clear()
        self._wake_drain()
        self._check_idle()
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        """Our write buffer is over `write_buffer_bytes` (a peer not reading): read nothing
        more from it, so nothing more is queued for it, until it drains."""
        self._write_paused = True
        self._paused_at = self.loop.time()
        if self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except RuntimeError:  # already closing
                pass

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if self.transport is not None and not self.closed and not self._yielding:
            try:
                self.transport.resume_reading()
            except RuntimeError:  # already closing
                return
            if self._buf:
                self.data_received(b"")

    def _yield(self) -> None:
        """STREAMS_PER_PASS streams opened from one read: stop here, let the loop run
        everything else that is ready (other connections, the health probe), go on next
        turn. A client's burst of thousands of requests costs others one slice, not all."""
        self._yielding = True
        try:
            self.transport.pause_reading()
        except RuntimeError:
            return
        self.loop.call_soon(self._go_on)

    def _go_on(self) -> None:
        self._yielding = False
        if self.closed or self._write_paused or self.transport is None:
            return
        try:
            self.transport.resume_reading()
        except RuntimeError:
            return
        if self._buf:
            self.data_received(b"")

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # what a closed connection still sends is dropped, not kept
        buf = self._buf
        buf += data
        try:
            if not self._preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if not buf.startswith(PREFACE):
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                del buf[:len(PREFACE)]
                self._preface = True
            off, n = 0, len(buf)
            self._opened = 0
            while n - off >= 9:
                if self._write_paused or self._yielding:
                    break  # the rest waits in _buf; resume_writing / _go_on parse it
                length = int.from_bytes(buf[off:off + 3], "big")
                kind = buf[off + 3]
                if length > MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {MAX_FRAME}")
                if (kind == HEADERS or kind == CONTINUATION) and length > self.max_header_list:
                    # refused by its length, before it is buffered or decoded
                    raise ConnectionError_(ENHANCE_YOUR_CALM, "header block over the header-list bound")
                end = off + 9 + length
                if end > n:
                    break
                flags = buf[off + 4]
                sid = int.from_bytes(buf[off + 5:off + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[off + 9:end])
                off = end
                self._frame(kind, flags, sid, payload)
                if self.closed:
                    return
                if self._opened >= STREAMS_PER_PASS:
                    self._yield()
            if off:
                del buf[:off]
        except ConnectionError_ as e:
            if e.code == ENHANCE_YOUR_CALM:
                _log_calm(self.peer, str(e))
            else:
                log.debug("event=h2_connection_error peer=%s code=%d error=%s", self.peer, e.code, e)
            self._goaway(e.code, str(e))
            self._abort()

    def _calm(self, budget: Budget, what: str) -> None:
        if not budget.spend(self.loop.time()):
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"too many {what}")

    # ---- frames in --------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is not None and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, sid, payload)
        elif kind == HEADERS:
            self._headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if self._cont is None or self._cont[0] != sid:
                raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
            if not payload and not flags & END_HEADERS:
                self._calm(self._empty, "empty frames")
            block = self._cont[2]
            block += payload
            if len(block) > self.max_header_list:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "header block over the header-list bound")
            if flags & END_HEADERS:
                _, hflags, _ = self._cont
                self._cont = None
                self._headers_done(sid, hflags, bytes(block))
        elif kind == SETTINGS:
            self._calm(self._settings_budget, "SETTINGS frames")
            self._settings(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == PING:
            if len(payload) != 8 or sid:
                raise ConnectionError_(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            self._calm(self._pings, "PING frames")
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if not sid or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "bad RST_STREAM")
            if sid > self._last_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            self._calm(self._resets, "stream resets")
            s = self._streams.pop(sid, None)
            if s is not None:
                self._reset_stream(s)
                self._check_idle()
        elif kind == GOAWAY:
            self.going_away = True
            self._check_idle()
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "a client may not push")
        elif kind == PRIORITY:
            if not sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "bad PRIORITY")
            self._calm(self._priority, "PRIORITY frames")
        else:  # unknown frame types are ignored (RFC 9113 section 4.1), within a budget
            self._calm(self._empty, "empty or unknown frames")

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        # the last value of each identifier, applied once (a frame of 170,000 entries is
        # one C-level pass, not 170,000 walks over the open streams)
        values = dict(_SETTING.iter_unpack(payload))
        value = values.get(S_ENABLE_PUSH)
        if value is not None and value > 1:
            raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
        value = values.get(S_MAX_FRAME_SIZE)
        if value is not None:
            if not 16_384 <= value <= (1 << 24) - 1:
                raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
            self._peer_max_frame = value
        value = values.get(S_INITIAL_WINDOW_SIZE)
        if value is not None:
            if value > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
            delta = value - self._peer_initial
            self._peer_initial = value
            if delta:
                for s in self._streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "stream window overflow")
                    s._wake()
        self.write(frame(SETTINGS, ACK, 0))

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._peer_window += inc
            if self._peer_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            waiters, self._conn_waiters = self._conn_waiters, []
            for s in waiters:
                s._wake()
            return
        if sid > self._last_id:
            raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        s = self._streams.get(sid)
        if s is not None:
            if inc == 0:  # a stream error (RFC 9113 6.9)
                self._rst(s, PROTOCOL_ERROR)
                return
            s.send_window += inc
            if s.send_window > MAX_WINDOW:
                self._rst(s, FLOW_CONTROL_ERROR)
                return
            s._wake()

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "bad padding")
            payload = payload[1:len(payload) - payload[0]]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._headers_done(sid, flags, payload)
        else:
            if not payload:
                self._calm(self._empty, "empty frames")
            self._cont = (sid, flags, bytearray(payload))
            self._cont_opened = self._epoch

    def _decode(self, block: bytes) -> list:
        """A client sends the same block for every call of a kind; decoding it again gives
        the same headers as long as it leaves the table as it found it (no insertion, no
        size update: those must run every time) and the table has not changed since."""
        table = self._table
        hit = self._hcache.get(block)
        if hit is not None and hit[0] == table.changes:
            return hit[1]
        before = table.changes
        headers = self._decode_raw(block)
        if table.changes == before and not (block and 0x20 <= block[0] < 0x40):
            if len(self._hcache) >= 64:
                self._hcache.clear()
            self._hcache[block] = (before, headers)
        return headers

    def _decode_raw(self, block: bytes) -> list:
        try:
            return Headers(self._decoder.decode(block))
        except hpack.OversizedHeaderListError:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header list too large") from None
        except hpack.HPACKError as e:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {e}") from None
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {type(e).__name__}") from None

    def _headers_done(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always, to keep the decoder's table in step
        end = bool(flags & END_STREAM)
        s = self._streams.get(sid)
        if s is not None:  # trailers of a request
            if not end or s.closed_remote:  # trailers that do not end it, or a second end
                log.debug("event=h2_stream_error peer=%s stream=%d error=%s", self.peer, sid,
                          "trailers without END_STREAM" if not end else "HEADERS after END_STREAM")
                self._rst(s, PROTOCOL_ERROR if not end else STREAM_CLOSED)
                return
            s.closed_remote = True
            if s.on_data is not None:
                self._guard(s.on_data, s, b"", True)
            return
        if sid <= self._last_id:
            raise ConnectionError_(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self._last_id = sid
        if self.going_away or self.closed or len(self._streams) >= self.max_streams:
            self._calm(self._resets, "refused streams")
            self.write(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        self._active = True
        self._opened += 1
        s = Stream(self, sid, self._peer_initial)
        s.headers = headers
        s.closed_remote = end
        self._streams[sid] = s
        self._guard(self.on_stream, s, s, end)

    def _guard(self, fn, s: Stream, *args) -> None:
        """An application callback that raises is a bug: that stream is reset
        (INTERNAL_ERROR), the connection and its other streams go on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            log.error("event=h2_stream_error peer=%s stream=%d error=%r", self.peer, s.id, e)
            log.debug("traceback", exc_info=e)
            self.reset(s, INTERNAL_ERROR)

    def _credit(self, n: int) -> None:
        """n bytes of the connection's receive window are free again: granted back in
        batches of half the window."""
        self._recv_unacked += n
        if self._recv_unacked >= CONN_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, self._recv_unacked.to_bytes(4, "big")))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # the whole frame, padding too, counts against both windows
        self._recv_window -= size
        if self._recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        end = bool(flags & END_STREAM)
        if not size and not end:
            self._calm(self._empty, "empty frames")
        pad = 0
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise ConnectionError_(PROTOCOL_ERROR, "bad padding")
            pad = payload[0] + 1
            payload = payload[1:size - payload[0]]
        s = self._streams.get(sid)
        if s is None:
            self._credit(size)
            if sid > self._last_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already finished or reset: drop (RFC 9113 6.1)
        if s.closed_remote:
            self._credit(size)
            self._rst(s, STREAM_CLOSED)
            return
        s.recv_window -= size
        s.held += size
        if s.recv_window < 0:
            self._rst(s, FLOW_CONTROL_ERROR)
            return
        if pad:
            s.consumed(pad)
        if end:
            s.closed_remote = True
        if s.on_data is not None:
            self._guard(s.on_data, s, payload, end)
        if s.closed_local and s.closed_remote:
            self._finish(s)

    # ---- housekeeping ---------------------------------------------------------------------
    def _tick(self) -> None:
        """Every `_tick_s`: the timeouts of this connection, checked together (one timer
        per connection, none per request)."""
        self._timer = None
        if self.closed:
            return
        self._epoch += 1
        now = self.loop.time()
        lim = self.limits
        try:
            if not self._preface:
                if now - self._made >= lim.preface_s:
                    raise ConnectionError_(PROTOCOL_ERROR, "no HTTP/2 preface in time")
            elif self._cont is not None and self._epoch - self._cont_opened > self._body_ticks:
                raise ConnectionError_(PROTOCOL_ERROR, "header block not finished in time")
            if self._write_paused and now - self._paused_at >= lim.window_s:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "the peer stopped reading")
        except ConnectionError_ as e:
            log.debug("event=h2_connection_timeout peer=%s error=%s", self.peer, e)
            self._goaway(e.code, str(e))
            self._abort()
            return
        if self._streams or self._active:
            self._active = False
            self._idle_since = now
            late = [s for s in self._streams.values()
                    if not s.closed_remote and not s.streaming
                    and self._epoch - s.opened > self._body_ticks]
            for s in late:
                log.debug("event=h2_body_timeout peer=%s stream=%d", self.peer, s.id)
                if s.on_body_timeout is not None:
                    self._guard(s.on_body_timeout, s)
                if self._streams.get(s.id) is s:
                    self._rst(s, CANCEL)
        elif now - self._idle_since >= lim.idle_s:
            log.debug("event=h2_idle_close peer=%s idle_s=%s", self.peer, lim.idle_s)
            self.go_away()
            return
        if self._age_at is not None and now >= self._age_at:
            if not self._aged:
                self._aged = True
                self._age_at = now + lim.max_age_grace_s
                log.debug("event=h2_max_age peer=%s", self.peer)
                self.go_away()
            else:
                self.close()
                return
        if not self.closed:
            self._timer = self.loop.call_later(self._tick_s, self._tick)

    # ---- frames out ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def send_headers(self, s: Stream, block: bytes, end_stream: bool) -> None:
        if s.reset or s.closed_local:
            return
        self.write(self._header_frames(s.id, block, end_stream))
        if end_stream:
            self._close_local(s)

    def _header_frames(self, sid: int, block: bytes, end_stream: bool) -> bytes:
        m = self._peer_max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= m:
            return frame(HEADERS, flags | END_HEADERS, sid, block)
        parts = [block[i:i + m] for i in range(0, len(block), m)]
        out = [frame(HEADERS, flags, sid, parts[0])]
        out += [frame(CONTINUATION, 0, sid, p) for p in parts[1:-1]]
        out.append(frame(CONTINUATION, END_HEADERS, sid, parts[-1]))
        return b"".join(out)

    def try_send(self, s: Stream, payload: bytes, trailers: bytes | None,
                 headers: bytes | None = None) -> bool:
        n = len(payload)
        if s.reset or s.closed_local:
            return True  # nothing to send to: count it as done
        if n > self._peer_window or n > s.send_window or n > self._peer_max_frame:
            return False
        self._peer_window -= n
        s.send_window -= n
        out = frame(DATA, 0, s.id, payload)
        if headers is not None:
            out = self._header_frames(s.id, headers, False) + out
        if trailers is not None:
            out += self._header_frames(s.id, trailers, True)
        self.write(out)
        if trailers is not None:
            self._close_local(s)
        return True

    async def send_data(self, s: Stream, payload: bytes) -> None:
        """DATA frames as the peer's windows open; raises ConnectionResetError when the
        stream or connection goes away first (or the window stays shut `window_s`)."""
        view = memoryview(payload)
        while True:  # at least one frame: an empty payload is one empty DATA frame
            if s.reset or self.closed:
                raise ConnectionResetError("stream reset")
            n = min(view.nbytes, self._peer_window, s.send_window, self._peer_max_frame)
            if n <= 0 and view.nbytes:
                if self._peer_window <= 0:
                    self._conn_waiters.append(s)
                await s._wait_window()
                continue
            self._peer_window -= n
            s.send_window -= n
            self.write(frame(DATA, 0, s.id, bytes(view[:n])))
            view = view[n:]
            if not view.nbytes:
                return
            if self._write_paused:  # let the socket drain before queueing more
                if self._drain is None:
                    self._drain = self.loop.create_future()
                await self._drain

    def _close_local(self, s: Stream) -> None:
        s.closed_local = True
        if not s.closed_remote:
            # a response ended before the request did (an error on a stream still
            # sending): tell the peer to stop (RFC 9113 8.1)
            self.write(frame(RST_STREAM, 0, s.id, NO_ERROR.to_bytes(4, "big")))
        self._finish(s)

    def _finish(self, s: Stream) -> None:
        if self._streams.get(s.id) is s:
            del self._streams[s.id]
        if s.held:
            self._credit(s.held)
            s.held = 0
        self._check_idle()

    def _rst(self, s: Stream, code: int) -> None:
        self.write(frame(RST_STREAM, 0, s.id, code.to_bytes(4, "big")))
        self._streams.pop(s.id, None)
        self._reset_stream(s)
        self._check_idle()
        if code != CANCEL and not self._resets.spend(self.loop.time()):
            # resets this client provokes spend the same budget as the ones it sends
            _log_calm(self.peer, "too many provoked stream resets")
            self._goaway(ENHANCE_YOUR_CALM, "too many provoked stream resets")
            self._abort()

    def reset(self, s: Stream, code: int = CANCEL) -> None:
        """The application gives up on a stream (a deadline, a too-large message)."""
        if not s.reset and not (s.closed_local and s.closed_remote):
            self._rst(s, code)

    def _reset_stream(self, s: Stream) -> None:
        if s.held:
            self._credit(s.held)
            s.held = 0
        if s.reset:
            return
        s.reset = True
        s._wake()
        if s.on_reset is not None:
            s.on_reset()

    def _goaway(self, code: int, message: str = "") -> None:
        self.write(frame(GOAWAY, 0, 0, self._last_id.to_bytes(4, "big") + code.to_bytes(4, "big")
                         + message.encode("utf-8", "replace")[:256]))

    def _abort(self) -> None:
        self._close_transport()
        self.closed = True
        self._buf = bytearray()  # up to a read's worth of frames nobody will parse
        self._hcache.clear()

    def _close_transport(self) -> None:
        """Close after what is queued is flushed; a peer that does not read would keep
        that open forever, so a second later it is cut."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
            if not self._lost:
                self.loop.call_later(1.0, self._cut)

    def _cut(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.abort()

    # ---- shutdown -----------------------------------------------------------------------
    def go_away(self) -> None:
        """Graceful: no new streams (GOAWAY NO_ERROR with the last stream we accepted);
        those in flight finish; the connection closes once they have."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._goaway(NO_ERROR)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._streams or not self.going_away:
            return
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if not self.closed:
            self._close_transport()

    async def wait_idle(self) -> None:
        if not self._streams or self.closed:
            return
        self._idle = self.loop.create_future()
        await self._idle

    def close(self) -> None:
        """Hard stop at the end of the grace period: streams still open are cancelled."""
        if not self.closed:
            self._goaway(NO_ERROR)
            self._abort()
            self.connection_lost(None)
