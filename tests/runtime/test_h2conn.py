"""runtime/server/grpc/h2conn.py's HPACK parts against the `hpack` package's own coder: our
cached decoding must give what a plain decoder gives, call after call, through table
insertions, evictions and size updates; our stateless encoder must decode as sent."""

from __future__ import annotations

import asyncio

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from runtime.server.grpc.h2conn import H2Connection, encode_headers

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

NAMES = [":path", ":authority", "content-type", "te", "x-user-id", "grpc-timeout", "x-a", "x-b"]
header = st.tuples(st.sampled_from(NAMES), st.text("abcdefgh/0123456789", min_size=0, max_size=40))
block = st.lists(header, min_size=1, max_size=6)
step = st.one_of(block.map(lambda b: ("send", b)), st.sampled_from([0, 64, 256, 4096]).map(lambda n: ("size", n)))


def _conn() -> H2Connection:
    async def make():
        return H2Connection(lambda s, e: None, max_streams=8, max_header_list=1 << 16)
    return asyncio.run(make())


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40), st.integers(1, 5))
def test_cached_decoding_equals_a_plain_decoder(steps, repeats):
    conn = _conn()
    enc, plain = hpack.Encoder(), hpack.Decoder()
    for kind, arg in steps:
        if kind == "size":
            enc.header_table_size = arg  # the next block starts with a size update
            continue
        for _ in range(repeats):  # the same headers again: often the same bytes
            data = enc.encode(arg)
            try:
                want = plain.decode(data)
            except hpack.HPACKError:
                # hpack's encoder sends only the last of two size changes between blocks
                # (RFC 7541 4.2 wants the smallest too): the reference is out of step
                return
            assert [tuple(h) for h in conn._decode(data)] == [tuple(h) for h in want]


def test_the_same_block_after_a_table_change_is_decoded_again():
    conn = _conn()
    enc, plain = hpack.Encoder(), hpack.Decoder()
    first = enc.encode([("x-a", "one")])          # inserted: index 62 is x-a: one
    plain.decode(first), conn._decode(first)
    ref = enc.encode([("x-a", "one")])            # b"\xbe": refers to the table
    assert conn._decode(ref) == plain.decode(ref)
    change = enc.encode([("x-b", "two")])         # now 62 is x-b: two
    plain.decode(change), conn._decode(change)
    again = b"\xbe"                               # the same bytes mean something else now
    assert [tuple(h) for h in conn._decode(again)] == [tuple(h) for h in plain.decode(again)] == [("x-b", "two")]


def test_encoded_headers_decode_as_sent():
    headers = [(":status", "200"), ("x-long", "v" * 300), (b"grpc-status", b"0"), ("x-" + "n" * 200, "é")]
    got = hpack.Decoder().decode(encode_headers(headers), raw=True)
    assert got == [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
                   for n, v in headers]


# ---- the hostile-client bounds (issue 25), frame by frame on a fake transport ---------------
import struct  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from runtime.config.settings import GrpcLimits  # noqa: E402
from runtime.server.grpc import h2conn  # noqa: E402
from runtime.server.grpc.h2conn import Budget, frame  # noqa: E402


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data):
        self.out += data

    def get_extra_info(self, name):
        return ("127.0.0.1", 1) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def frames(self):
        out, buf = [], bytes(self.out)
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            out.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9:9 + n]))
            buf = buf[9 + n:]
        self.out.clear()
        return out


def _live(body, **limits):
    """Run body(conn, transport, streams) on a connection past its preface, in a loop."""
    async def run():
        streams = []
        conn = H2Connection(lambda s, end: streams.append(s), limits=GrpcLimits(**limits))
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(h2conn.PREFACE + frame(h2conn.SETTINGS, 0, 0))
        t.frames()
        try:
            return body(conn, t, streams)
        finally:
            conn.connection_lost(None)
    return asyncio.run(run())


def _goaway(frames):
    codes = [int.from_bytes(p[4:8], "big") for k, _, _, p in frames if k == h2conn.GOAWAY]
    return codes[0] if codes else None


def _open(conn, sid, end=False):
    block = hpack.Encoder().encode([(":method", "POST"), (":path", "/a/b"),
                                    ("content-type", "application/grpc")])
    conn.data_received(frame(h2conn.HEADERS, 0x4 | (0x1 if end else 0), sid, block))


def test_budget_counts_over_a_sliding_window():
    b = Budget(10, 1.0, now=0.0)
    assert all(b.spend(0.1 * i / 10) for i in range(10))
    assert not b.spend(0.2)  # the 11th within the window
    b = Budget(10, 1.0, now=0.0)
    for _ in range(10):
        b.spend(0.9)
    b.spend(1.05)
    assert not b.spend(1.05)  # the last window still mostly counts (9.5 of its 10)
    assert b.spend(2.95)  # and fades out


@pytest.mark.parametrize("kind,payload,sid,limit", [
    (h2conn.PING, b"12345678", 0, "max_pings"),
    (h2conn.SETTINGS, b"", 0, "max_settings"),
    (h2conn.PRIORITY, bytes(5), 3, "max_priority"),
    (0x42, b"", 0, "max_empty_frames"),  # an unknown type
])
def test_a_flood_past_its_budget_is_enhance_your_calm(kind, payload, sid, limit):
    def body(conn, t, streams):
        already = 1 if kind == h2conn.SETTINGS else 0  # the client preface's own SETTINGS
        conn.data_received(frame(kind, 0, sid, payload) * (20 - already))
        assert not conn.closed
        conn.data_received(frame(kind, 0, sid, payload))
        return _goaway(t.frames()), conn.closed
    assert _live(body, **{limit: 20}) == (h2conn.ENHANCE_YOUR_CALM, True)


def test_rapid_reset_spends_the_reset_budget():
    def body(conn, t, streams):
        for i in range(6):
            _open(conn, 1 + 2 * i)
            conn.data_received(frame(h2conn.RST_STREAM, 0, 1 + 2 * i, (8).to_bytes(4, "big")))
        return _goaway(t.frames())
    assert _live(body, max_resets=5) == h2conn.ENHANCE_YOUR_CALM


def test_priority_on_stream_0_and_rst_on_an_idle_stream_are_protocol_errors():
    assert _live(lambda c, t, s: (c.data_received(frame(h2conn.PRIORITY, 0, 0, bytes(5))),
                                  _goaway(t.frames()))[1]) == h2conn.PROTOCOL_ERROR
    assert _live(lambda c, t, s: (c.data_received(frame(h2conn.RST_STREAM, 0, 9, bytes(4))),
                                  _goaway(t.frames()))[1]) == h2conn.PROTOCOL_ERROR


def test_a_zero_window_update_on_a_stream_resets_it():
    def body(conn, t, streams):
        _open(conn, 1)
        conn.data_received(frame(h2conn.WINDOW_UPDATE, 0, 1, bytes(4)))
        return [(k, sid, int.from_bytes(p, "big")) for k, _, sid, p in t.frames()], conn.closed
    frames, closed = _live(body)
    assert (h2conn.RST_STREAM, 1, h2conn.PROTOCOL_ERROR) in frames and not closed


def test_settings_apply_the_last_value_once():
    """A 1 MiB SETTINGS frame of window entries over 200 open streams: one pass."""
    def body(conn, t, streams):
        for i in range(200):
            _open(conn, 1 + 2 * i)
        n = (1 << 20) // 6
        payload = b"".join(struct.pack(">HI", 4, 1000 + i) for i in range(n))
        t0 = time.perf_counter()
        conn.data_received(frame(h2conn.SETTINGS, 0, 0, payload))
        took = time.perf_counter() - t0
        acks = [f for f in t.frames() if f[0] == h2conn.SETTINGS and f[1] == 1]
        return took, acks, {s.send_window for s in streams}
    took, acks, windows = _live(body)
    assert acks and windows == {1000 + (1 << 20) // 6 - 1}
    assert took < 0.5, took


def test_a_header_block_over_the_bound_is_refused_unread():
    def body(conn, t, streams):
        conn._decoder = None  # decoding it would fail loudly
        conn.data_received(frame(h2conn.HEADERS, 0x4, 1, b"\x00" * 20_000)[:9 + 100])
        return _goaway(t.frames()), conn.closed
    assert _live(body, max_header_list_bytes=16_384) == (h2conn.ENHANCE_YOUR_CALM, True)


def test_receive_windows_are_enforced_and_reopen_as_consumed():
    def body(conn, t, streams):
        _open(conn, 1)
        s = streams[0]
        held = []
        s.on_data = lambda data, end: held.append(len(data))
        chunk = bytes(1 << 20)
        for _ in range(4):  # the whole 4 MiB stream window, nothing consumed
            conn.data_received(frame(h2conn.DATA, 0, 1, chunk))
        granted = [f for f in t.frames() if f[0] == h2conn.WINDOW_UPDATE]
        assert not granted and s.held == 4 << 20  # nothing granted back before it is used
        conn.data_received(frame(h2conn.DATA, 0, 1, b"x"))  # one byte past it
        frames = t.frames()
        assert (h2conn.RST_STREAM, 1) in [(k, sid) for k, _, sid, _ in frames]
        assert not conn.closed
        assert conn._recv_unacked == (4 << 20) + 1  # a reset stream's bytes go back to the connection
        _open(conn, 3)
        s3 = streams[1]
        s3.on_data = lambda data, end: s3.consumed(len(data))
        for _ in range(4):
            conn.data_received(frame(h2conn.DATA, 0, 3, chunk))
        ups = {sid: int.from_bytes(p, "big") for k, _, sid, p in t.frames() if k == h2conn.WINDOW_UPDATE}
        assert ups.get(0) == (8 << 20) + 1 and ups.get(3) == 2 << 20, ups  # half of each window
        return True
    assert _live(body)


def test_a_peer_that_does_not_read_stops_being_read():
    def body(conn, t, streams):
        conn.pause_writing()
        assert not t.reading
        conn.data_received(frame(h2conn.PING, 0, 0, b"12345678") * 3)
        assert not t.frames() and len(conn._buf) == 51  # kept, not answered
        conn.resume_writing()
        return t.reading, len([f for f in t.frames() if f[0] == h2conn.PING])
    assert _live(body) == (True, 3)


def test_a_burst_of_streams_is_parsed_a_slice_per_loop_turn():
    """100 requests in one read: STREAMS_PER_PASS of them now, the rest on later turns
    of the loop (other connections run in between), none lost."""
    async def run():
        streams = []
        conn = H2Connection(lambda s, end: streams.append(s), limits=GrpcLimits())
        t = FakeTransport()
        conn.connection_made(t)
        enc = hpack.Encoder()
        block = [(":method", "POST"), (":path", "/a/b"), ("content-type", "application/grpc")]
        burst = b"".join(frame(h2conn.HEADERS, 0x5, 1 + 2 * i, enc.encode(block)) for i in range(100))
        conn.data_received(h2conn.PREFACE + frame(h2conn.SETTINGS, 0, 0) + burst)
        first, paused = len(streams), not t.reading
        turns = 0
        while len(streams) < 100 and turns < 10:
            await asyncio.sleep(0)
            turns += 1
        conn.connection_lost(None)
        return first, paused, len(streams), turns, t.reading
    first, paused, total, turns, reading = asyncio.run(run())
    assert first == h2conn.STREAMS_PER_PASS and paused
    assert total == 100 and turns == 3 and reading
