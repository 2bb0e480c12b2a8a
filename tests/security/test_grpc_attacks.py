"""The gRPC front door against hostile clients (issue 25): each known HTTP/2 attack class,
with real frames on loopback, against a real server process. Every test asserts that the
attack is stopped (connection closed, or stream refused, with the right code, within a
bound) and, through `Watch`, that meanwhile a normal client on its own connection saw no
failure and a p99 under 250 ms, `/v2/health/ready` answered within 1 s every time, and
the server's RSS grew less than 50 MB.

The server runs with short timeouts (preface 1 s, idle 2 s, body 1 s, window 2 s) so the
slow-client cases finish in seconds; every other bound is the shipped default.
`h2` is splitserve's own transport (the default); the tests marked `both` run against
grpcio (`--grpc-transport grpcio`) too; the rest cover bounds only our transport has
(grpcio's are its own and partly absent: rapid reset is unmitigated in grpc.aio, and a
PRIORITY flood grows its RSS without bound: an expected failure there).
Set SPLITSERVE_SECURITY_REPORT=path to get one JSON line per attack.
"""

from __future__ import annotations

import re
import shutil
import struct
import threading
import time
import zlib

import hpack
import pytest

from tests.security import h2attack
from tests.security.h2attack import (
    CONTINUATION, DATA, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, HEADERS, INFER, LIVE,
    NO_ERROR, PING, PREFACE, PRIORITY, RST_STREAM, SETTINGS, WINDOW_UPDATE, ServerUnderAttack,
    Watch, Wire,
    frame, message, write_config)

from conftest import MLP_YAML
import make_example_models as mk
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(120)

LIMITS = {"max_connections": 32, "preface_s": 1.0, "idle_s": 2.0, "body_s": 1.0,
          "window_s": 2.0, "max_age_s": 0}
MAX_BODY = 4 << 20
CLOSE_S = 2.0  # a flood is over well before this (its budget runs out in milliseconds)
CANCEL = 0x8
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL = "8", "4", "12", "13"


def _server(tmp_path_factory, version_cache, transport: str) -> ServerUnderAttack:
    base = tmp_path_factory.mktemp(f"attack-{transport}")
    repo = base / "repo"
    mk.write_model_folder(repo / "mlp", MLP_YAML)
    shutil.copytree(version_cache / "st1", repo / "mlp" / "1")
    cfg = write_config(base / "settings.yaml", LIMITS, MAX_BODY)
    proc = ServerProcess(repo, "--grpc-transport", transport, config=cfg,
                         log_path=base / "server.log")
    try:
        proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    srv = ServerUnderAttack(proc)
    srv.transport = transport
    return srv


@pytest.fixture(scope="module")
def h2(tmp_path_factory, version_cache):
    srv = _server(tmp_path_factory, version_cache, "h2")
    yield srv
    srv.proc.stop()


@pytest.fixture(scope="module")
def grpcio(tmp_path_factory, version_cache):
    srv = _server(tmp_path_factory, version_cache, "grpcio")
    yield srv
    srv.proc.stop()


@pytest.fixture(params=["h2", "grpcio"])
def both(request):
    return request.getfixturevalue(request.param)


def _flood(w: Wire, chunk: bytes, seconds: float = 3.0, read: bool = True) -> None:
    """Send `chunk` again and again until the server closes or `seconds` pass; read what
    it answers on another thread (or never, with read=False)."""
    stop = threading.Event()
    reader = None
    if read:
        reader = threading.Thread(target=lambda: w.pump(until=lambda s: stop.is_set(), deadline=seconds + 5,
                                                        decode=False), daemon=True)
        reader.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end and w.seen.closed_after is None and w.seen.goaway is None:
        if not w.send(chunk):
            break
    stop.set()
    if reader is not None:
        reader.join(10)
    w.pump(deadline=CLOSE_S, decode=False)


ATTACK_S = 2.0  # an attacker reconnects and goes on this long


def _repeat(srv, prepare, read: bool = True) -> list:
    """The attack again on a new connection each time the server closes one, for
    ATTACK_S: `prepare(wire)` opens what it needs and returns the chunk to flood with."""
    seens = []
    end = time.monotonic() + ATTACK_S
    while time.monotonic() < end:
        w = Wire(srv.grpc_port)
        chunk = prepare(w)
        _flood(w, chunk, seconds=ATTACK_S + 2, read=read)
        seens.append(w.seen)
        w.close()
    return seens


def _assert_calm(seens: list, name: str, goaway_seen: bool = True) -> None:
    for seen in seens:
        assert seen.closed_after is not None and seen.closed_after < CLOSE_S + 1, f"{name}: still open ({seen})"
        # a reset connection may lose the GOAWAY in flight; when it arrives it says why
        assert seen.goaway in (None, ENHANCE_YOUR_CALM), f"{name}: GOAWAY code {seen.goaway}"
    if goaway_seen:
        assert any(seen.goaway == ENHANCE_YOUR_CALM for seen in seens), f"{name}: no GOAWAY read"


def _closed(seens: list) -> dict:
    after = [s.closed_after for s in seens]
    return {"connections": len(seens), "closed_after_s_max": max(after) if None not in after else None}


# ---- the table, row by row ----------------------------------------------------------

@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A gzip message of ~1 MB that inflates to 1 GiB (valid: CRC and size included):
    one fully flushed deflate block of 1 MiB of zeros, 1,024 times."""
    z = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(z, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + block * 1024 + c.flush()
            + struct.pack("<II", crc, (1 << 30) & 0xFFFFFFFF))


def test_gzip_bomb_is_refused_at_the_bound(both, bomb):
    """(both) 1 MB inflating to 1 GiB, five times, sent within the server's windows:
    RESOURCE_EXHAUSTED each time, and the server never holds more than
    `limits.max_body_bytes` of it."""
    w = Wire(both.grpc_port)
    w.ack_settings = True  # one thread here: a well-behaved client but for the bomb
    body = message(bomb, compressed=True)
    with Watch(both, f"gzip_bomb_{both.transport}") as watch:
        t0 = time.monotonic()
        for i in range(5):
            sid = 1 + 2 * i
            assert w.send(frame(HEADERS, END_HEADERS, sid, w.block(INFER, encoding="gzip")))
            answered = lambda s, sid=sid: sid in s.trailers or sid in s.resets  # noqa: E731
            w.send_data(sid, body, done=answered, deadline=20)
            w.pump(until=answered, deadline=10)
            assert w.seen.trailers.get(sid, {}).get("grpc-status") == RESOURCE_EXHAUSTED, w.seen
        elapsed = time.monotonic() - t0
        watch.check(refused_after_s=round(elapsed / 5, 3))
    w.close()


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_flood_whose_answers_are_never_read(h2, kind):
    """CVE-2019-9512 / 9515: PINGs or SETTINGS as fast as the socket takes them, the ACKs
    never read. The budget closes the connection; nothing piles up meanwhile."""
    one = frame(PING, 0, 0, b"12345678") if kind == "ping" else frame(SETTINGS, 0, 0)
    with Watch(h2, f"{kind}_flood_unread") as watch:
        seens = _repeat(h2, lambda w: one * 4096, read=False)
        watch.check(**_closed(seens))
    _assert_calm(seens, kind, goaway_seen=False)


def _open_stream(w: Wire, sid: int, end_headers: bool = True) -> bytes:
    return frame(HEADERS, END_HEADERS if end_headers else 0, sid, w.block(INFER))


def _cheap(kind: str):
    def prepare(w: Wire) -> bytes:
        if kind == "ping":
            return frame(PING, 0, 0, b"abcdefgh") * 2048
        if kind == "empty_data":
            w.send(_open_stream(w, 1))
            return frame(DATA, 0, 1) * 2048
        if kind == "empty_continuation":
            w.send(_open_stream(w, 1, end_headers=False))
            return frame(CONTINUATION, 0, 1) * 2048
        if kind == "priority":
            return frame(PRIORITY, 0, 3, bytes(5)) * 2048
        # RST_STREAM for a stream already over
        w.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, w.block(LIVE)))
        return frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")) * 2048
    return prepare


GRPCIO_CHEAP = {"ping": "goaway", "empty_data": "closed", "empty_continuation": "closed",
                "priority": "survives", "rst_unknown": "survives"}


@pytest.mark.parametrize("kind", ["ping", "empty_data", "empty_continuation", "priority",
                                  "rst_unknown"])
def test_cheap_frame_floods_end_in_enhance_your_calm(both, kind):
    """(both) CVE-2019-9518 shapes, the answers read: on h2 each kind has a per-connection
    budget over a sliding window; past it, GOAWAY ENHANCE_YOUR_CALM and close. grpcio
    sends GOAWAY for PINGs (and closes later), closes (another code) on empty frames, and lets PRIORITY and
    stray RST_STREAM through: there the normal client and the probe are checked, and RSS
    growth past the bound is an expected failure (+17 to +90 MB measured in 2 s)."""
    expect = GRPCIO_CHEAP[kind] if both.transport == "grpcio" else "calm"
    with Watch(both, f"{kind}_flood_{both.transport}") as watch:
        seens = _repeat(both, _cheap(kind))
        r = watch.check(rss=expect != "survives", **_closed(seens))
    if expect == "survives" and r["rss_growth_mb"] >= h2attack.RSS_GROWTH_MB:
        pytest.xfail(f"grpcio does not bound a {kind} flood: RSS +{r['rss_growth_mb']} MB in {ATTACK_S} s")
    if expect == "calm":
        _assert_calm(seens, kind)
    elif expect == "goaway":  # grpcio: GOAWAY too_many_pings, closed after its own grace
        assert all(s.goaway == ENHANCE_YOUR_CALM or s.closed_after is not None for s in seens), seens[:2]
    elif expect == "closed":
        assert all(s.closed_after is not None and s.closed_after < CLOSE_S + 1 for s in seens), seens[:2]


def test_rapid_reset_ends_in_enhance_your_calm(h2):
    """CVE-2023-44487: HEADERS then RST_STREAM at once, stream after stream."""
    def prepare(w: Wire) -> bytes:
        pairs = []
        for i in range(2048):
            sid = 1 + 2 * i
            pairs.append(_open_stream(w, sid) + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))
        return b"".join(pairs)
    with Watch(h2, "rapid_reset") as watch:
        seens = _repeat(h2, prepare)
        watch.check(**_closed(seens))
    _assert_calm(seens, "rapid reset")


def test_requests_whose_answers_are_never_read_pause_reading(h2):
    """Requests as fast as the socket takes them, no answer read (reflection: ~50 bytes in,
    kilobytes out): the server stops reading once its write buffer is over the bound, so
    answers cannot pile up, and cuts the connection when the client has not read for
    `window_s`."""
    from grpc_reflection.v1alpha import reflection_pb2
    w = Wire(h2.grpc_port, rcvbuf=4096)
    # every window wide open: nothing but the server's own write buffer holds its answers
    w.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, (1 << 31) - 1))
           + frame(WINDOW_UPDATE, 0, 0, ((1 << 31) - 1 - 65_535).to_bytes(4, "big")))
    msg = message(reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="inference.GRPCInferenceService").SerializeToString())
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    batch = []
    pad = "p" * 8000  # never indexed: every request carries it, so our sends fill the socket
    for i in range(8192):
        sid = 1 + 2 * i
        block = w.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                              (":authority", "x"), ("content-type", "application/grpc"),
                              hpack.NeverIndexedHeaderTuple("x-pad", pad)], huffman=False)
        batch.append(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, msg))
    w.sock.settimeout(1.0)
    sent = 0
    with Watch(h2, "answers_never_read") as watch:
        for chunk in batch:
            try:
                w.sock.sendall(chunk)
                sent += 1
            except TimeoutError:
                break  # the server stopped reading: our sends block
            except OSError:
                w.seen.closed_after = time.monotonic() - w.t0
                break
        blocked = time.monotonic() - w.t0
        # nothing read; wait for the server to cut the connection
        deadline = time.monotonic() + LIMITS["window_s"] + 6
        while w.seen.closed_after is None and time.monotonic() < deadline:
            try:
                w.sock.sendall(batch[0][:1])  # fails once the server is gone
            except TimeoutError:
                pass
            except OSError:
                w.seen.closed_after = time.monotonic() - w.t0
            time.sleep(0.1)
        watch.check(requests_sent=sent, blocked_after_s=round(blocked, 2),
                    closed_after_s=w.seen.closed_after)
    assert sent < len(batch), "the server never stopped reading"
    assert w.seen.closed_after is not None, "a client that never reads was never cut"
    assert w.seen.closed_after < blocked + LIMITS["window_s"] + 2, (blocked, w.seen.closed_after)
    w.close()


def test_one_settings_frame_of_many_window_entries_is_one_pass(h2):
    """A 1 MiB SETTINGS frame of INITIAL_WINDOW_SIZE entries while 200 streams are open:
    the last value is applied once, acknowledged at once."""
    w = Wire(h2.grpc_port)
    w.send(b"".join(_open_stream(w, 1 + 2 * i) for i in range(200)))
    entries = (1 << 20) // 6
    payload = b"".join(struct.pack(">HI", 4, 65_535 + (i & 1) * 1000) for i in range(entries))
    with Watch(h2, "settings_window_entries") as watch:
        w.pump(until=lambda s: s.settings_acks >= 1, deadline=5)
        t0 = time.monotonic()
        w.send(frame(SETTINGS, 0, 0, payload))
        w.pump(until=lambda s: s.settings_acks >= 2, deadline=5)
        acked = time.monotonic() - t0
        watch.check(acked_after_s=round(acked, 3))
    assert w.seen.settings_acks >= 2 and acked < 0.5, (acked, w.seen)
    w.close()


def test_a_header_block_over_the_bound_is_refused_before_decoding(both):
    """(both) One 1 MiB HEADERS frame: refused without decoding it (h2: GOAWAY
    ENHANCE_YOUR_CALM at the frame header; grpcio: its own bound)."""
    w = Wire(both.grpc_port)
    big = w.enc.encode([(":method", "POST"), (":path", INFER), ("x-big", "a" * ((1 << 20) - 200))],
                       huffman=False)[: (1 << 20) - 1]
    with Watch(both, "headers_1mib") as watch:
        t0 = time.monotonic()
        w.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, big))
        w.pump(until=lambda s: s.goaway is not None or 1 in s.resets or 1 in s.trailers,
               deadline=5, decode=False)
        refused = time.monotonic() - t0
        watch.check(refused_after_s=round(refused, 3), goaway=w.seen.goaway)
    assert w.seen.goaway is not None or 1 in w.seen.resets or 1 in w.seen.trailers or \
        w.seen.closed_after is not None, w.seen
    assert refused < 1.0
    w.close()


def test_a_declared_length_over_the_bound_is_refused_before_buffering(both):
    """(both) A message declaring 4 GiB: RESOURCE_EXHAUSTED after its first kilobyte."""
    w = Wire(both.grpc_port)
    with Watch(both, "declared_4gib") as watch:
        t0 = time.monotonic()
        w.send(_open_stream(w, 1) + frame(DATA, 0, 1, message(bytes(1024), declared=(1 << 32) - 1)))
        w.pump(until=lambda s: 1 in s.trailers or 1 in s.resets, deadline=5)
        refused = time.monotonic() - t0
        watch.check(refused_after_s=round(refused, 3))
    if 1 in w.seen.trailers:
        assert w.seen.trailers[1].get("grpc-status") == RESOURCE_EXHAUSTED, w.seen
    else:
        assert 1 in w.seen.resets, w.seen
    assert refused < 1.0
    w.close()


def test_slow_clients_are_closed_by_the_timeouts(h2):
    """No preface, half a preface, idle after it, a body never finished, a header block
    never finished: each closed (or its stream answered) by its own timeout."""
    with Watch(h2, "slow_clients") as watch:
        none = Wire(h2.grpc_port, preface=False)
        half = Wire(h2.grpc_port, preface=False)
        half.send(PREFACE[:12])
        idle = Wire(h2.grpc_port)
        body = Wire(h2.grpc_port)
        body.send(_open_stream(body, 1) + frame(DATA, 0, 1, message(b"", declared=100) + bytes(10)))
        cont = Wire(h2.grpc_port)
        cont.send(_open_stream(cont, 1, end_headers=False))
        wires = {"no_preface": none, "half_preface": half, "idle": idle, "body": body,
                 "header_block": cont}
        threads = [threading.Thread(target=w.pump, kwargs={"deadline": 8, "decode": False})
                   for w in wires.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        closed = {k: w.seen.closed_after for k, w in wires.items()}
        watch.check(closed_after_s=closed)
    assert closed["no_preface"] is not None and closed["no_preface"] < LIMITS["preface_s"] + 1.5, closed
    assert closed["half_preface"] is not None and closed["half_preface"] < LIMITS["preface_s"] + 1.5, closed
    assert idle.seen.goaway == NO_ERROR, idle.seen
    assert closed["idle"] is not None and closed["idle"] < LIMITS["idle_s"] + 1.5, closed
    assert body.seen.trailers.get(1, {}).get("grpc-status") == DEADLINE_EXCEEDED or 1 in body.seen.resets, body.seen
    assert closed["header_block"] is not None and closed["header_block"] < LIMITS["body_s"] + 1.5, closed
    for w in wires.values():
        w.close()


def test_connections_over_the_cap_are_refused(h2):
    """`max_connections` per process: the next one gets GOAWAY (last stream 0) and is
    closed; the connections already open go on."""
    wires = []
    with Watch(h2, "max_connections") as watch:
        for _ in range(LIMITS["max_connections"] + 8):
            wires.append(Wire(h2.grpc_port))
        refused = []
        for w in wires:
            w.pump(until=lambda s: s.settings_acks >= 1 or s.goaway is not None, deadline=3,
                   decode=False)
            if w.seen.goaway is not None:
                refused.append(w)
        watch.check(refused=len(refused))
    assert 8 <= len(refused) <= 9, len(refused)  # the watcher's own connection counts too
    assert all(w.seen.goaway == NO_ERROR for w in refused)
    for w in wires:
        w.close()
    end = time.monotonic() + 10  # the server has counted them closed: a new one is served
    while True:
        w = Wire(h2.grpc_port)
        ok = w.pump(until=lambda s: s.settings_acks >= 1 or s.goaway is not None, deadline=3,
                    decode=False).goaway is None
        w.close()
        if ok or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert ok, "connections closed by the client were never released"


def test_malformed_requests_are_answered_quietly(h2):
    """Empty or upper-case header names and a second END_STREAM, 400 requests: each ends
    its stream with a gRPC status (or a stream reset), and not one ERROR line is logged."""
    before = len(h2.proc.lines())
    w = Wire(h2.grpc_port)
    msg = message(b"")
    with Watch(h2, "malformed") as watch:
        for i in range(200):
            sid = 1 + 4 * i
            bad = ("", "x") if i % 2 else ("X-Upper", "x")
            w.send(frame(HEADERS, END_HEADERS, sid, w.block(LIVE, extra=[bad]))
                   + frame(DATA, END_STREAM, sid, msg)
                   + frame(HEADERS, END_HEADERS, sid + 2, w.block(LIVE))
                   + frame(DATA, END_STREAM, sid + 2, msg) + frame(DATA, END_STREAM, sid + 2))
        last = 1 + 4 * 199
        w.pump(until=lambda s: last in s.trailers and (last + 2 in s.trailers or last + 2 in s.resets),
               deadline=10)
        watch.check(streams=400)
    assert w.seen.closed_after is None, w.seen
    assert all(w.seen.trailers.get(1 + 4 * i, {}).get("grpc-status") == INTERNAL for i in range(200))
    errors = [line for line in h2.proc.lines()[before:] if "level=ERROR" in line]
    assert not errors, errors[:3]
    w.close()


def test_unknown_method_paths_are_not_kept(h2):
    """4,096 distinct unknown methods with 8 KB paths: UNIMPLEMENTED each, memory flat."""
    w = Wire(h2.grpc_port)
    with Watch(h2, "unknown_methods") as watch:
        for batch in range(16):
            out = []
            for i in range(256):
                sid = 1 + 2 * (batch * 256 + i)
                path = f"/no.Such/M{sid:06d}" + "x" * 8000
                block = w.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                      (":authority", "x"), ("content-type", "application/grpc")],
                                     huffman=False)
                out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
            assert w.send(b"".join(out))
            last = 1 + 2 * (batch * 256 + 255)
            w.pump(until=lambda s: last in s.trailers, deadline=10)
        watch.check(methods=4096)
    codes = {h.get("grpc-status") for h in w.seen.trailers.values()}
    assert codes == {UNIMPLEMENTED} and len(w.seen.trailers) == 4096, (codes, len(w.seen.trailers))
    w.close()


def test_the_server_log_has_one_line_per_event(h2):
    """After every attack above: no traceback reached the log at INFO."""
    assert not [line for line in h2.proc.lines() if line.startswith("Traceback")
                or re.match(r"\s+File \"", line)]
