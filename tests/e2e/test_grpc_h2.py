"""splitserve's own gRPC transport (server.grpc_transport h2, runtime/server/grpc/h2.py and
h2conn.py) where it differs from grpcio's: flow control both ways, compression,
deadlines, cancellation, metadata, server streaming, and the HTTP/2 rules a real client
may exercise. grpcio's client drives the first part; the second sends frames by hand
(HPACK from the `hpack` package, not ours), so each rule is checked on the wire. The
behaviour shared with grpcio's server runs against all three transports in test_grpc.py
and test_tritonclient.py."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import hpack
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import MLP_YAML, expected_output, wait_until
from tests.reliability.reliability_helpers import write_slow_model
from runtime.protocol import kserve_grpc as codec
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc


def _req(x: np.ndarray, model="mlp", version="", name="input") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()])


def _out(resp) -> np.ndarray:
    return codec.decode_output(resp.outputs[0], resp.raw_output_contents[0])


BIG_BATCH = MLP_YAML.replace("max_batch_size: 64", "max_batch_size: 32768")
assert BIG_BATCH != MLP_YAML


@pytest.fixture
def mlp(make_repo, serve):
    return serve(make_repo({"mlp": {1: "st1"}}, yaml={"mlp": BIG_BATCH}))


def test_messages_larger_than_every_window_cross_both_ways(mlp):
    """A 6 MiB request (over our 4 MiB stream window and grpcio's frame size) and a
    response over the client's initial 64 KiB window: both wait on WINDOW_UPDATEs."""
    x = np.random.default_rng(0).standard_normal((24_000, 64)).astype(np.float32)
    with grpc.insecure_channel(mlp.grpc,
                               options=[("grpc.max_receive_message_length", -1),
                                        ("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(2):  # and the connection still serves after
            resp = stub.ModelInfer(_req(x), timeout=60)
            want = expected_output(1, torch.from_numpy(x)).numpy()
            assert resp.raw_output_contents[0].__len__() > 64 * 1024
            np.testing.assert_allclose(_out(resp), want, rtol=1e-5, atol=1e-6)


def test_gzip_and_deflate_requests(mlp):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    want = expected_output(1, torch.from_numpy(x)).numpy()
    for comp in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        with grpc.insecure_channel(mlp.grpc, compression=comp) as ch:
            resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_req(x), timeout=10)
            np.testing.assert_allclose(_out(resp), want, rtol=1e-5, atol=1e-6)


def test_a_compressed_message_over_the_limit_is_refused_after_inflating(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}), max_body_bytes=64 * 1024)
    zeros = np.zeros((400, 64), np.float32)  # ~100 KB, a few hundred bytes gzipped
    with grpc.insecure_channel(srv.grpc, compression=grpc.Compression.Gzip) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_req(zeros), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in e.value.details()
        assert stub.ModelInfer(_req(zeros[:4]), timeout=10).model_version == "1"


def test_trailing_metadata_and_binary_request_metadata(mlp):
    x = np.ones((1, 64), np.float32)
    with grpc.insecure_channel(mlp.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        resp, call = stub.ModelInfer.with_call(
            _req(x), metadata=(("x-user-id", "u-1"), ("trace-bin", b"\x00\xff\x01")), timeout=10)
        trailing = dict(call.trailing_metadata())
        assert trailing["x-model-version"] == "1" and trailing["x-request-id"] == resp.id
        assert "x-route" in trailing


def test_health_watch_streams_from_the_server(mlp):
    with grpc.insecure_channel(mlp.grpc) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_deadline_and_cancel_stop_the_call_and_the_connection_serves_on(tmp_path, serve):
    repo = tmp_path / "repo"
    write_slow_model(repo, delay=0.4)
    srv = serve(repo)
    x = np.ones((1, 64), np.float32)
    with grpc.insecure_channel(srv.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_req(x, model="slow"), timeout=0.05)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        fut = stub.ModelInfer.future(_req(x, model="slow"), timeout=10)
        time.sleep(0.05)  # let it reach the server: what is checked is that cancel works, not when
        assert fut.cancel()
        assert stub.ModelInfer(_req(x, model="slow"), timeout=10).model_name == "slow"


# ---- the wire, by hand ---------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + payload


class Wire:
    """A raw HTTP/2 client connection: frames out, frames in (with a deadline)."""

    def __init__(self, port: int, preface: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self.buf = b""
        if preface:
            self.sock.sendall(PREFACE + _frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers_block(self, path: str, ctype: str = "application/grpc", extra=()) -> bytes:
        return self.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                (":authority", "localhost"), ("content-type", ctype),
                                ("te", "trailers"), *extra])

    def frame(self, deadline: float = 10.0):
        """The next frame (kind, flags, stream id, payload), or None when the peer closed."""
        end = time.monotonic() + deadline
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        f = (self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF, self.buf[9:9 + n])
        self.buf = self.buf[9 + n:]
        return f

    def until(self, pred, deadline: float = 10.0):
        """Frames until pred(frame) holds: (that frame, headers decoded on the way);
        (None, ...) when the peer closed, ("timeout", ...) when nothing more came."""
        got = []
        end = time.monotonic() + deadline
        while True:
            try:
                f = self.frame(max(0.01, end - time.monotonic()))
            except TimeoutError:
                return "timeout", got
            if f is None:
                return None, got
            if f[0] in (HEADERS, CONTINUATION):
                got.append((f[2], dict(self.dec.decode(f[3]))))
            if pred(f):
                return f, got

    def close(self):
        self.sock.close()


def _message(msg) -> bytes:
    body = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _trailers_of(w: Wire, sid: int) -> dict:
    f, got = w.until(lambda f: f[0] in (HEADERS, CONTINUATION) and f[1] & 0x1 and f[2] == sid)
    assert f is not None, "no trailers"
    merged = {}
    for s, h in got:
        if s == sid:
            merged.update(h)
    return merged


LIVE = "/inference.GRPCInferenceService/ServerLive"


def test_settings_and_ping_are_acknowledged(mlp):
    w = Wire(mlp.server.grpc_port)
    w.send(_frame(PING, 0, 0, b"12345678"))
    seen = []
    f, _ = w.until(lambda f: seen.append(f) or f[0] == PING)
    assert f[1] == 0x1 and f[3] == b"12345678"
    assert any(k == SETTINGS and flags == 0x1 for k, flags, _, _ in seen)  # ours acknowledged
    assert any(k == SETTINGS and flags == 0 for k, flags, _, _ in seen)  # and the server's own
    w.close()


def test_headers_in_continuation_frames_and_padded_data(mlp):
    w = Wire(mlp.server.grpc_port)
    block = w.headers_block(LIVE, extra=[("x-pad", "p" * 300)])
    w.send(_frame(HEADERS, 0, 1, block[:10]) + _frame(CONTINUATION, 0, 1, block[10:40])
           + _frame(CONTINUATION, 0x4, 1, block[40:]))
    msg = _message(pb.ServerLiveRequest())
    w.send(_frame(DATA, 0x1 | 0x8, 1, bytes((3,)) + msg + b"\x00\x00\x00"))  # PADDED, 3 bytes
    t = _trailers_of(w, 1)
    assert t["grpc-status"] == "0"
    w.close()


def _slow_wire(tmp_path, serve, delay: float) -> Wire:
    """A raw connection to a server whose model `slow` takes `delay` seconds a forward."""
    repo = tmp_path / "repo"
    write_slow_model(repo, delay=delay)
    return Wire(serve(repo).server.grpc_port)


def test_unknown_method_wrong_content_type_and_deadline(tmp_path, serve):
    w = _slow_wire(tmp_path, serve, 2.0)
    w.send(_frame(HEADERS, 0x4 | 0x1, 1, w.headers_block("/no.Such/Method")))
    t = _trailers_of(w, 1)
    assert t["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])

    w.send(_frame(HEADERS, 0x4 | 0x1, 3, w.headers_block(LIVE, ctype="application/json")))
    f, got = w.until(lambda f: f[0] == HEADERS and f[2] == 3)
    assert dict(got[-1][1])[":status"] == "415"

    x = np.ones((1, 64), np.float32)
    w.send(_frame(HEADERS, 0x4, 5, w.headers_block("/inference.GRPCInferenceService/ModelInfer",
                                                    extra=[("grpc-timeout", "50m")]))
           + _frame(DATA, 0x1, 5, _message(_req(x, model="slow"))))
    t0 = time.monotonic()
    t = _trailers_of(w, 5)
    assert t["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert time.monotonic() - t0 < 1.5  # answered at the deadline, not after the 2 s forward
    w.close()


def test_a_reset_stream_is_dropped_and_the_connection_serves_on(tmp_path, serve):
    w = _slow_wire(tmp_path, serve, 0.3)
    x = np.ones((1, 64), np.float32)
    w.send(_frame(HEADERS, 0x4, 1, w.headers_block("/inference.GRPCInferenceService/ModelInfer"))
           + _frame(DATA, 0x1, 1, _message(_req(x, model="slow")))
           + _frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    w.send(_frame(HEADERS, 0x4 | 0x1, 3, w.headers_block(LIVE)))  # no body: zero messages
    t = _trailers_of(w, 3)
    assert t["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])  # "exactly one message"
    w.send(_frame(HEADERS, 0x4, 5, w.headers_block(LIVE)) + _frame(DATA, 0x1, 5, _message(pb.ServerLiveRequest())))
    t = _trailers_of(w, 5)
    assert t["grpc-status"] == "0"
    f, got = w.until(lambda f: False, deadline=0.6)  # nothing more arrives for stream 1
    assert f == "timeout" and all(sid != 1 for sid, _ in got)
    w.close()


def test_protocol_errors_end_the_connection_not_the_server(mlp):
    # HTTP/1.1 on the gRPC port: closed
    s = socket.create_connection(("127.0.0.1", mlp.server.grpc_port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    # an even stream id: GOAWAY PROTOCOL_ERROR, then closed
    w = Wire(mlp.server.grpc_port)
    w.send(_frame(HEADERS, 0x5, 2, w.headers_block(LIVE)))
    f, _ = w.until(lambda f: f[0] == GOAWAY)
    assert f is not None and int.from_bytes(f[3][4:8], "big") == 0x1
    assert w.until(lambda f: False, deadline=5)[0] is None  # the server closed it
    w.close()
    # and a frame over our advertised maximum: FRAME_SIZE_ERROR
    w = Wire(mlp.server.grpc_port)
    w.send((1 << 20 | 1).to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big"))
    f, _ = w.until(lambda f: f[0] == GOAWAY)
    assert f is not None and int.from_bytes(f[3][4:8], "big") == 0x6
    w.close()
    with grpc.insecure_channel(mlp.grpc) as ch:
        assert pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_many_concurrent_calls_on_one_connection(mlp):
    """64 calls in flight on one channel (one connection): every answer right."""
    xs = [np.random.default_rng(i).standard_normal((2, 64)).astype(np.float32) for i in range(64)]
    with grpc.insecure_channel(mlp.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        futs = [stub.ModelInfer.future(_req(x), timeout=30) for x in xs]
        for x, f in zip(xs, futs):
            np.testing.assert_allclose(_out(f.result()), expected_output(1, torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-6)


def test_stop_lets_calls_in_flight_finish(tmp_path, serve):
    """Server stop: GOAWAY to the client; a call already running still gets its answer."""
    repo = tmp_path / "repo"
    write_slow_model(repo, delay=0.4)
    srv = serve(repo)
    x = np.ones((1, 64), np.float32)
    out = {}
    ch = grpc.insecure_channel(srv.grpc)
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live

    def call():
        try:
            out["resp"] = stub.ModelInfer(_req(x, model="slow"), timeout=30)
        except grpc.RpcError as e:
            out["err"] = e
    t = threading.Thread(target=call)
    t.start()
    assert wait_until(lambda: srv.core.inference.inflight > 0, timeout=10)
    srv.stop()
    t.join(30)
    ch.close()
    assert "resp" in out, out.get("err")


def test_bad_binary_metadata_is_an_error_for_that_call_only(mlp):
    w = Wire(mlp.server.grpc_port)
    w.send(_frame(HEADERS, 0x4, 1, w.headers_block(LIVE, extra=[("trace-bin", "not base64!")]))
           + _frame(DATA, 0x1, 1, _message(pb.ServerLiveRequest())))
    t = _trailers_of(w, 1)
    assert t["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0]) and "base64" in t["grpc-message"]
    w.send(_frame(HEADERS, 0x4, 3, w.headers_block(LIVE, extra=[("trace-bin", "AAEC")]))
           + _frame(DATA, 0x1, 3, _message(pb.ServerLiveRequest())))
    assert _trailers_of(w, 3)["grpc-status"] == "0"
    w.close()


def test_a_host_with_two_addresses_listens_on_one_port_for_both(make_repo, serve, monkeypatch):
    """With port 0, `localhost` as ::1 and 127.0.0.1 (as on most hosts) is served on one
    port, the one reported: the first address picks it, the second joins it."""
    real = socket.getaddrinfo

    def both(host, *args, **kwargs):
        if host == "localhost":
            return real("::1", *args, **kwargs) + real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)
    srv = serve(make_repo({"mlp": {1: "st1"}}), host="localhost")
    port = srv.server.grpc_port
    for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
        with grpc.insecure_channel(target) as ch:
            assert pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=10).live, target


def test_max_connection_age_is_a_graceful_goaway_clients_ride_through(make_repo, serve):
    """server.grpc_limits.max_age_s: GOAWAY NO_ERROR at the age (+-10%), closed once idle;
    a channel calling throughout reconnects without one failed call (what rebalances
    long-lived channels across workers and pods)."""
    from runtime.config.settings import GrpcLimits
    srv = serve(make_repo({"mlp": {1: "st1"}}),
                grpc_limits=GrpcLimits(max_age_s=1.0, max_age_grace_s=1.0, preface_s=1.0))
    w = Wire(srv.server.grpc_port)
    t0 = time.monotonic()
    f, _ = w.until(lambda f: f[0] == GOAWAY, deadline=10)
    assert f is not None and f != "timeout" and int.from_bytes(f[3][4:8], "big") == 0
    assert time.monotonic() - t0 < 1.1 + 0.25 + 1.5  # the age, one tick, margin
    assert w.until(lambda f: False, deadline=5)[0] is None  # and closed: no stream was open
    w.close()
    failures, calls = [], 0
    with grpc.insecure_channel(srv.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        end = time.monotonic() + 3.5  # across at least two ages
        while time.monotonic() < end:
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
                calls += 1
            except grpc.RpcError as e:
                failures.append(e.code())
    assert calls > 10 and not failures, (calls, failures)
