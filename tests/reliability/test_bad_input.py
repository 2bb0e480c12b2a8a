"""Scenario 3: bad input, every protocol.

Over KServe v2 REST, KServe v2 gRPC and TF Serving REST: malformed JSON, wrong types,
wrong shapes, too many elements, truncated binary data, a wrong
Inference-Header-Content-Length, unknown model/version/label, huge bodies, slow clients,
NaN values, empty tensors. Each gets a clear 4xx (gRPC: a non-OK status that is not
INTERNAL/UNKNOWN) with a message, and a correct request right after still succeeds.
Property-based: hypothesis fuzzes the v2 request decoder (nothing but ServingError may
escape), schemathesis fuzzes the live REST API from its OpenAPI schema (no 500).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reliability_helpers import (BODY, MLP_YAML, X, LiveServer, LogCapture, answer_of,
                                 outputs_of, percentile, wait_until)
from runtime.errors import ServingError
from runtime.protocol import kserve_grpc as gcodec
from runtime.protocol import kserve_rest
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc

MAX_BODY = 1 << 20
MAX_ELEMENTS = 10_000
REQUEST_TIMEOUT_S = 2.0
EXPECTED_1 = answer_of(1)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, version_cache):
    import shutil

    import make_example_models as mk
    from runtime.config.settings import Settings

    base = tmp_path_factory.mktemp("bad_input")
    repo = base / "repo"
    mk.write_model_folder(repo / "mlp", MLP_YAML)
    shutil.copytree(version_cache / "st1", repo / "mlp" / "1")
    cfg = base / "routing.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 1}\n")
    s = Settings()
    s.server.http_port = 0
    s.server.grpc_port = 0
    s.server.drain_timeout_s = 2
    s.repository.path = repo
    s.repository.quiet_s = 0.2
    s.limits.max_body_bytes = MAX_BODY
    s.limits.max_elements = MAX_ELEMENTS
    s.limits.request_timeout_s = REQUEST_TIMEOUT_S
    s.config_path = cfg
    server = LiveServer(s)
    assert server.available("mlp") == [1]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        yield c


def good(client) -> None:
    """A correct request right after a bad one: still answered, with the right numbers."""
    r = client.post("/v2/models/mlp/infer", json=BODY)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(outputs_of(r.json()), EXPECTED_1, rtol=1e-5, atol=1e-5)


def clear_error(r: httpx.Response, status: int | tuple[int, ...], *needles: str) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    msg = r.json()["error"]
    assert isinstance(msg, str) and len(msg) > 10
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


def tensor(shape, data=None, datatype="FP32", name="input", **extra):
    t = {"name": name, "datatype": datatype, "shape": shape, **extra}
    if data is not None:
        t["data"] = data
    return t


ROW = [0.5] * 64

# (id, body bytes or JSON object, status, words the message must contain)
REST_CASES = [
    ("malformed-json", b'{"inputs": [', 400, ["malformed JSON"]),
    ("not-json", b"\x00\xff\xfe garbage", 400, ["malformed JSON"]),
    ("empty-body", b"", 400, ["malformed JSON"]),
    ("json-null", b"null", 400, ["JSON object"]),
    ("json-list", b"[1, 2, 3]", 400, ["JSON object"]),
    ("no-inputs", {"outputs": []}, 400, ["inputs"]),
    ("inputs-empty", {"inputs": []}, 400, ["inputs"]),
    ("inputs-not-list", {"inputs": {"name": "input"}}, 400, ["inputs"]),
    ("input-not-object", {"inputs": [42]}, 400, ["inputs[0]"]),
    ("name-missing", {"inputs": [{"datatype": "FP32", "shape": [1, 64], "data": ROW}]}, 400, ["name"]),
    ("name-unknown", {"inputs": [tensor([1, 64], ROW, name="x")]}, 400, ["unexpected input", "x"]),
    ("name-twice", {"inputs": [tensor([1, 64], ROW), tensor([1, 64], ROW)]}, 400, ["twice"]),
    ("datatype-unknown", {"inputs": [tensor([1, 64], ROW, datatype="FLOAT32")]}, 400, ["unknown datatype"]),
    ("datatype-mismatch", {"inputs": [tensor([1, 64], ROW, datatype="FP64")]}, 400, ["FP64", "FP32"]),
    ("datatype-bytes", {"inputs": [tensor([1, 64], ["a"] * 64, datatype="BYTES")]}, 400, ["BYTES"]),
    ("data-strings", {"inputs": [tensor([1, 64], ["a"] * 64)]}, 400, ["does not fit datatype FP32"]),
    ("data-objects", {"inputs": [tensor([1, 64], [{"x": 1}] * 64)]}, 400, ["input"]),
    ("data-ragged", {"inputs": [tensor([2, 64], [ROW, ROW[:10]])]}, 400, ["input"]),
    ("data-missing", {"inputs": [tensor([1, 64])]}, 400, ["data"]),
    ("shape-string", {"inputs": [tensor("1x64", ROW)]}, 400, ["shape"]),
    ("shape-negative", {"inputs": [tensor([1, -64], ROW)]}, 400, ["shape"]),
    ("shape-float", {"inputs": [tensor([1.0, 64], ROW)]}, 400, ["shape"]),
    ("shape-bool", {"inputs": [tensor([True, 64], ROW)]}, 400, ["shape"]),
    ("shape-data-mismatch", {"inputs": [tensor([2, 64], ROW)]}, 400, ["needs 128 elements", "64"]),
    ("shape-wrong-rank", {"inputs": [tensor([64], ROW)]}, 400, ["shape [64]", "[-1, 64]"]),
    ("shape-wrong-width", {"inputs": [tensor([2, 32], ROW)]}, 400, ["shape [2, 32]"]),
    ("batch-too-big", {"inputs": [tensor([65, 64], ROW * 65)]}, 400, ["max_batch_size"]),
    ("empty-tensor", {"inputs": [tensor([0, 64], [])]}, 400, ["empty batch"]),
    ("empty-scalar", {"inputs": [tensor([], [])]}, 400, ["input"]),
    ("parameters-not-object", {"inputs": [tensor([1, 64], ROW)], "parameters": [1]}, 400, ["parameters"]),
    ("outputs-unknown", {"inputs": [tensor([1, 64], ROW)], "outputs": [{"name": "nope"}]}, 400, ["nope"]),
    ("outputs-not-list", {"inputs": [tensor([1, 64], ROW)], "outputs": "output"}, 400, ["outputs"]),
    ("nan-literal", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[NaN]}]}', 400,
     ["malformed JSON"]),
    ("deep-nesting", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": '
     + b"[" * 5000 + b"]" * 5000 + b"}]}", 400, ["JSON"]),
]


@pytest.mark.parametrize("case", REST_CASES, ids=[c[0] for c in REST_CASES])
def test_rest_v2_bad_body(srv, client, case):
    _, body, status, needles = case
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v2/models/mlp/infer", **kw, headers={"content-type": "application/json"})
    clear_error(r, status, *needles)
    good(client)


def test_rest_v2_too_many_elements_is_a_client_error(client):
    """Over max_elements can never succeed on retry: a 4xx (413 or 400), not a 503 that
    tells clients and load balancers to retry later."""
    n = MAX_ELEMENTS // 64 + 1
    r = client.post("/v2/models/mlp/infer", json={"inputs": [tensor([n, 64], ROW * n)]})
    clear_error(r, (400, 413), str(MAX_ELEMENTS))
    good(client)


# ---- binary extension --------------------------------------------------------------------
def binary_body(arr: np.ndarray, declared_size: int | None = None, tail: bytes = b""):
    head = json.dumps({"inputs": [tensor(list(arr.shape), datatype="FP32", parameters={
        "binary_data_size": arr.nbytes if declared_size is None else declared_size})]}).encode()
    return head, head + arr.tobytes() + tail


def post_binary(client, body: bytes, header_len) -> httpx.Response:
    return client.post("/v2/models/mlp/infer", content=body,
                       headers={"Inference-Header-Content-Length": str(header_len),
                                "content-type": "application/octet-stream"})


def test_binary_correct_then_faults(client):
    head, body = binary_body(X)
    r = post_binary(client, body, len(head))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(outputs_of(r.json()), EXPECTED_1, rtol=1e-5, atol=1e-5)
    cases = {
        "truncated-data": (body[:-100], len(head), ["runs past"]),
        "size-larger-than-data": (binary_body(X, declared_size=X.nbytes + 4)[1],
                                  len(binary_body(X, declared_size=X.nbytes + 4)[0]), ["runs past"]),
        "size-wrong-for-shape": (binary_body(X, declared_size=X.nbytes - 4)[1],
                                 len(binary_body(X, declared_size=X.nbytes - 4)[0]), ["binary"]),
        "extra-bytes": (body + b"\x00" * 12, len(head), ["after the last input"]),
        "header-len-past-body": (body, len(body) + 1, ["Inference-Header-Content-Length"]),
        "header-len-negative": (body, -1, ["Inference-Header-Content-Length"]),
        "header-len-not-int": (body, "12abc", ["Inference-Header-Content-Length"]),
        "header-len-cuts-json": (body, len(head) - 5, ["malformed JSON"]),
        "header-len-into-binary": (body, len(head) + 8, ["malformed JSON"]),
        "header-len-zero": (body, 0, ["malformed JSON"]),
    }
    for name, (b, hl, needles) in cases.items():
        r = post_binary(client, b, hl)
        try:
            clear_error(r, 400, *needles)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from None
        good(client)


def test_nan_and_inf_values_do_not_crash(client):
    """JSON cannot carry NaN: the binary path can. The model's NaN outputs come back as
    JSON null (well-formed JSON), or bit-exact as binary output."""
    bad = X.copy()
    bad[0, :] = np.nan
    bad[1, 0] = np.inf
    head, body = binary_body(bad)
    r = post_binary(client, body, len(head))
    assert r.status_code == 200, r.text
    doc = json.loads(r.content)  # strict JSON: no NaN / Infinity tokens
    data = doc["outputs"][0]["data"]
    assert len(data) == 16 and all(v is None or isinstance(v, float) for v in data)
    assert data[:8] == [None] * 8
    # binary output keeps the NaNs
    head2 = json.dumps({"inputs": [tensor([2, 64], datatype="FP32", parameters={"binary_data_size": bad.nbytes})],
                        "parameters": {"binary_data_output": True}}).encode()
    r = post_binary(client, head2 + bad.tobytes(), len(head2))
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    out = np.frombuffer(r.content[hl:], dtype=np.float32).reshape(2, 8)
    assert np.isnan(out[0]).all()
    good(client)


# ---- where: model, version, label --------------------------------------------------------
@pytest.mark.parametrize("path,status,needle", [
    ("/v2/models/nope/infer", 404, "nope"),
    ("/v2/models/mlp/versions/9/infer", 404, "version 9"),
    ("/v2/models/mlp/versions/abc/infer", 400, "version"),
    ("/v2/models/mlp/versions/0/infer", 400, "version"),
    ("/v2/models/mlp/versions/01/infer", 400, "version"),
    ("/v2/models/mlp/versions/-1/infer", 400, "version"),
    ("/v2/models/mlp/versions/99999999999999999999999/infer", 400, "version"),
    ("/v1/models/nope:predict", 404, "nope"),
    ("/v1/models/mlp/versions/9:predict", 404, "version 9"),
    ("/v1/models/mlp/versions/x:predict", 400, "version"),
    ("/v1/models/mlp/labels/nope:predict", 400, "label"),
    ("/v1/models/mlp:explode", 400, "Malformed"),
])
def test_unknown_model_version_label(client, path, status, needle):
    body = {"instances": X.tolist()} if path.startswith("/v1") else BODY
    clear_error(client.post(path, json=body), status, needle)
    good(client)


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/models/mlp/versions/{v}/infer"),
    ("GET", "/v2/models/mlp/versions/{v}"),
    ("GET", "/v2/models/mlp/versions/{v}/ready"),
    ("GET", "/v2/models/mlp/versions/{v}/config"),
    ("GET", "/v2/models/mlp/versions/{v}/stats"),
    ("GET", "/v1/models/mlp/versions/{v}"),
    ("GET", "/v1/models/mlp/versions/{v}/metadata"),
    ("POST", "/v1/models/mlp/versions/{v}:predict"),
])
def test_non_ascii_digit_versions_are_400_not_500(client, method, path):
    """str.isdigit() is true for '²', '٣', '１': int() then raises (a 500) or quietly
    accepts them as another version number."""
    body = {"instances": X.tolist()} if path.startswith("/v1") else BODY
    for v in ("\u00b2", "1\u00b9", "\uff11", "\u0663"):
        r = client.request(method, path.format(v=v), json=body if method == "POST" else None)
        try:
            clear_error(r, 400, "version")
        except AssertionError as e:
            raise AssertionError(f"version {v!r}: {e}") from None
        good(client)


def test_tfserving_rest_bad_bodies(client):
    ok = client.post("/v1/models/mlp/labels/stable:predict", json={"instances": X.tolist()})
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(np.array(ok.json()["predictions"], dtype=np.float32), EXPECTED_1,
                               rtol=1e-5, atol=1e-5)
    cases = [b'{"instances": [', b"", b"[]", b'{"instances": [[1, 2]]}', b'{"instances": "x"}',
             b'{"inputs": {"input": [["a"] ]}}', b'{"instances": [[1], [1, 2]]}',
             b'{"instances": [], "inputs": []}', b'{"signature_name": 5}',
             json.dumps({"instances": [[0.0] * 64] * (MAX_ELEMENTS // 64 + 1)}).encode()]
    for body in cases:
        r = client.post("/v1/models/mlp:predict", content=body,
                        headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, f"{body[:60]!r}: {r.status_code} {r.text[:200]}"
        assert isinstance(r.json()["error"], str) and r.json()["error"]
        good(client)


# ---- huge bodies -------------------------------------------------------------------------
def test_huge_bodies_get_413(srv, client):
    r = client.post("/v2/models/mlp/infer", content=b"x" * (MAX_BODY + 1))
    clear_error(r, 413, "limit")

    def chunks():  # no Content-Length: refused while streaming, not after buffering it all
        for _ in range(64):
            yield b"x" * 65536
    r = client.post("/v2/models/mlp/infer", content=chunks())
    clear_error(r, 413, "limit")
    r = client.post("/v1/models/mlp:predict", content=b" " * (MAX_BODY + 1))
    clear_error(r, 413, "limit")
    r = client.put("/v1/models/mlp/routing", content=b" " * (MAX_BODY + 1))
    assert r.status_code in (401, 413), r.text
    # a declared length far beyond the limit is refused before any byte of the body
    with socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    good(client)


def test_bad_http_framing_is_refused(srv, client):
    for raw in (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
                b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"NOT-HTTP\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 100_000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=10) as s:
            try:
                s.sendall(raw)
                head = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                head = b""
        assert head == b"" or head.startswith(b"HTTP/1.1 4"), head[:200]
        good(client)


# ---- slow clients ------------------------------------------------------------------------
def settle(server_log: LogCapture) -> None:
    """Wait until the server thread has logged (and formatted) the tracebacks of the
    disconnects we just caused, so no failure report is formatted while it does."""
    wait_until(lambda: server_log.records, 3)
    time.sleep(0.5)


def _slow_sockets(port: int) -> list[socket.socket]:
    socks = []
    for i in range(6):  # headers sent, then a body that stalls after a few bytes
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"in")
        socks.append(s)
    for i in range(4):  # slowloris: headers never finished
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def test_slow_clients_do_not_stop_the_others(srv, client):
    server_log = LogCapture("uvicorn.error").__enter__()
    socks = _slow_sockets(srv.server.http_port)
    stop = threading.Event()

    def trickle():  # two of them keep trickling one byte now and then
        while not stop.wait(0.2):
            for s in socks[:2]:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        lat = []
        for _ in range(40):
            t0 = time.monotonic()
            good(client)
            lat.append(time.monotonic() - t0)
        with grpc.insecure_channel(srv.grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelInfer(_grpc_req(X), timeout=10).model_version == "1"
        print(f"\n  with {len(socks)} slow clients: 40 requests, p50 {percentile(lat, 50) * 1e3:.1f} ms, "
              f"max {max(lat) * 1e3:.1f} ms")
        assert max(lat) < 2.0
    finally:
        stop.set()
        t.join(5)
        for s in socks:
            s.close()
        settle(server_log)
        server_log.__exit__(None, None, None)


def test_stalled_client_gets_a_clear_error(srv, client):
    """A client that sends headers and then stalls must not hold a connection (and a
    request task) forever: after about request_timeout_s it gets an error (408) or the
    connection is closed. Without a bound, a few hundred idle sockets pin the server and
    every graceful stop waits the whole drain timeout for them."""
    with LogCapture("uvicorn.error") as server_log:
        with socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=30) as s:
            s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"in")
            s.settimeout(REQUEST_TIMEOUT_S + 3)
            t0 = time.monotonic()
            try:
                head = s.recv(4096)
            except TimeoutError:
                head = None
            took = time.monotonic() - t0
        if head is None:
            # The server logs a traceback for the disconnect (ClientDisconnect) on its own
            # thread. Let it finish first: on Python 3.11, ast.parse (used by traceback
            # carets and by pytest's failure report) keeps one recursion counter per
            # interpreter, and two threads parsing at once corrupt it (INTERNALERROR).
            settle(server_log)
    assert head is not None, (f"a stalled request body was still open after {took:.1f}s "
                              f"(request_timeout_s={REQUEST_TIMEOUT_S:g})")
    assert head == b"" or head.startswith(b"HTTP/1.1 408") or head.startswith(b"HTTP/1.1 4"), head[:200]
    good(client)


# ---- gRPC --------------------------------------------------------------------------------
def _grpc_req(x: np.ndarray, version: str = "", model: str = "mlp", datatype: str = "FP32",
              shape=None, raw: bytes | None = None, name: str = "input"):
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)],
        raw_input_contents=[x.tobytes() if raw is None else raw])


def test_grpc_bad_requests(srv):
    if srv.grpc is None:
        pytest.skip("no gRPC server")
    SC = grpc.StatusCode
    cases = {
        "unknown-model": (_grpc_req(X, model="nope"), (SC.NOT_FOUND,)),
        "unknown-version": (_grpc_req(X, version="9"), (SC.NOT_FOUND,)),
        "bad-version": (_grpc_req(X, version="abc"), (SC.INVALID_ARGUMENT,)),
        "zero-version": (_grpc_req(X, version="0"), (SC.INVALID_ARGUMENT, SC.NOT_FOUND)),
        "wrong-datatype": (_grpc_req(X, datatype="FP64", raw=X.astype(np.float64).tobytes()), (SC.INVALID_ARGUMENT,)),
        "unknown-datatype": (_grpc_req(X, datatype="FLOAT"), (SC.INVALID_ARGUMENT,)),
        "truncated-raw": (_grpc_req(X, raw=X.tobytes()[:-7]), (SC.INVALID_ARGUMENT,)),
        "shape-mismatch": (_grpc_req(X, shape=[3, 64]), (SC.INVALID_ARGUMENT,)),
        "wrong-width": (_grpc_req(X.reshape(4, 32)), (SC.INVALID_ARGUMENT,)),
        "negative-dim": (_grpc_req(X, shape=[-2, 64]), (SC.INVALID_ARGUMENT,)),
        "unknown-input": (_grpc_req(X, name="x"), (SC.INVALID_ARGUMENT,)),
        "empty-tensor": (_grpc_req(np.zeros((0, 64), np.float32)), (SC.INVALID_ARGUMENT,)),
        "too-many-elements": (_grpc_req(np.zeros((MAX_ELEMENTS // 64 + 1, 64), np.float32)),
                              (SC.RESOURCE_EXHAUSTED, SC.INVALID_ARGUMENT)),
        "huge-message": (_grpc_req(np.zeros((MAX_BODY // 256 + 64, 64), np.float32)),
                         (SC.RESOURCE_EXHAUSTED,)),
        "no-inputs": (pb.ModelInferRequest(model_name="mlp"), (SC.INVALID_ARGUMENT,)),
        "raw-count-mismatch": (pb.ModelInferRequest(
            model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[2, 64])],
            raw_input_contents=[X.tobytes(), X.tobytes()]), (SC.INVALID_ARGUMENT,)),
    }
    with grpc.insecure_channel(srv.grpc, options=[("grpc.max_send_message_length", -1)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for name, (req, codes) in cases.items():
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelInfer(req, timeout=10)
            err = ei.value
            assert err.code() in codes, f"{name}: {err.code()} {err.details()}"
            assert err.details() and len(err.details()) > 10, name
            resp = stub.ModelInfer(_grpc_req(X), timeout=10)  # a correct one right after
            np.testing.assert_allclose(gcodec.decode_output(resp.outputs[0], resp.raw_output_contents[0]),
                                       EXPECTED_1, rtol=1e-5, atol=1e-5)
        # NaN in, NaN out: no crash
        bad = X.copy()
        bad[0, 0] = np.nan
        resp = stub.ModelInfer(_grpc_req(bad), timeout=10)
        out = gcodec.decode_output(resp.outputs[0], resp.raw_output_contents[0])
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


# ---- property-based ----------------------------------------------------------------------
_json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=5) |
                     st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=20)
_dtypes = st.sampled_from(["FP32", "FP64", "FP16", "BF16", "INT8", "INT32", "INT64", "UINT8",
                           "UINT64", "BOOL", "BYTES", "fp32", "", "STRING"]) | _json
_shape = st.lists(st.integers(-3, 40) | st.sampled_from([0, 2**31, 2**63]), max_size=4) | _json
_param = st.fixed_dictionaries({}, optional={
    "binary_data_size": st.integers(-4, 600) | _json, "x": _json})
_input = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["input", "x", ""]) | _json, "datatype": _dtypes, "shape": _shape,
    "data": _json | st.lists(st.floats(width=32, allow_nan=False) | st.integers(-300, 300), max_size=70),
    "parameters": _param | _json})
_doc = st.fixed_dictionaries({}, optional={
    "id": _json, "inputs": st.lists(_input, max_size=3) | _json,
    "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}, optional={
        "parameters": st.dictionaries(st.sampled_from(["binary_data", "x"]), _json)}), max_size=2) | _json,
    "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "sticky", "x"]), _json) | _json})


_ITEM = {"FP32": 4, "FP64": 8, "FP16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "UINT8": 1, "BOOL": 1}


@st.composite
def _near_valid(draw):
    """A well-formed request (JSON or binary tensors), sometimes with one field broken."""
    inputs, tail = [], b""
    for i in range(draw(st.integers(1, 2))):
        dt = draw(st.sampled_from(sorted(_ITEM) + ["BYTES"]))
        shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
        n = int(np.prod(shape))
        t = {"name": f"in{i}", "datatype": dt, "shape": shape}
        if dt != "BYTES" and draw(st.booleans()):
            raw = draw(st.binary(min_size=n * _ITEM[dt], max_size=n * _ITEM[dt]))
            t["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        elif dt == "BOOL":
            t["data"] = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        elif dt == "BYTES":
            t["data"] = draw(st.lists(st.text(max_size=3), min_size=n, max_size=n))
        elif dt.startswith("FP"):
            t["data"] = draw(st.lists(st.floats(-1e3, 1e3, width=16), min_size=n, max_size=n))
        else:
            t["data"] = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
        inputs.append(t)
    doc = {"inputs": inputs, "parameters": {"binary_data_output": draw(st.booleans())}}
    if draw(st.booleans()):  # break one thing
        t = draw(st.sampled_from(inputs))
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        t[key] = draw(_json)
    return doc, tail


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_near_valid(), cut=st.integers(0, 3))
def test_fuzz_decode_infer_near_valid(case, cut):
    doc, tail = case
    head = json.dumps(doc).encode()
    body = head + tail[:len(tail) - cut] if tail else head
    try:
        req, _ = kserve_rest.decode_infer(body, len(head) if tail else None, "mlp", None, 1000)
    except ServingError as e:
        assert e.message
        event("refused")
        return
    event("decoded")
    assert len(req.inputs) == len(doc["inputs"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=_doc, tail=st.binary(max_size=600), header=st.sampled_from(["exact", "none", "off"]),
       off=st.integers(-10, 10))
def test_fuzz_decode_infer_structured(doc, tail, header, off):
    head = json.dumps(doc).encode()
    body = head + tail
    hl = None if header == "none" else len(head) + (off if header == "off" else 0)
    try:
        req, binary_out = kserve_rest.decode_infer(body, hl, "mlp", None, 1000)
    except ServingError as e:
        assert e.message
        event("refused")
        return
    event("decoded")
    for t in req.inputs:
        assert isinstance(t.data, np.ndarray) and t.data.shape == tuple(t.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=400), hl=st.none() | st.integers(-5, 500))
def test_fuzz_decode_infer_bytes(body, hl):
    try:
        kserve_rest.decode_infer(body, hl, "mlp", 1, 1000)
    except ServingError:
        pass


_contents = st.fixed_dictionaries({}, optional={
    "fp32_contents": st.lists(st.floats(width=32), max_size=70),
    "fp64_contents": st.lists(st.floats(), max_size=5),
    "int_contents": st.lists(st.integers(-2**31, 2**31 - 1), max_size=5),
    "int64_contents": st.lists(st.integers(-2**63, 2**63 - 1), max_size=5),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=5),
    "bool_contents": st.lists(st.booleans(), max_size=5),
    "bytes_contents": st.lists(st.binary(max_size=5), max_size=5)})
_grpc_input = st.builds(
    dict, name=st.sampled_from(["input", "", "x"]),
    datatype=st.sampled_from(["FP32", "FP64", "INT8", "INT32", "INT64", "UINT8", "UINT32",
                              "BOOL", "BYTES", "BF16", "FP16", "", "FLOAT"]),
    shape=st.lists(st.integers(-3, 80) | st.sampled_from([2**40, 2**62]), max_size=3),
    contents=st.none() | _contents)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(inputs=st.lists(_grpc_input, max_size=3), raw=st.none() | st.lists(st.binary(max_size=300), max_size=3),
       version=st.sampled_from(["", "", "1", "0", "01", "x", "\u00b2", "9" * 30]),
       model=st.sampled_from(["mlp", "mlp", ""]), fix=st.booleans())
def test_fuzz_grpc_decode_infer(inputs, raw, version, model, fix):
    if fix and inputs:  # make it well-formed: raw contents of exactly the right size
        raw = []
        for t in inputs:
            t["shape"] = [min(max(d, 0), 4) for d in t["shape"]]
            item = _ITEM.get(t["datatype"], 2)
            raw.append(bytes(int(np.prod(t["shape"])) * item) if t["datatype"] != "BYTES" else
                       b"\x01\x00\x00\x00a" * int(np.prod(t["shape"])))
            t["contents"] = None
            t["name"] = t["name"] or "input"
            if t["datatype"] in ("", "FLOAT"):
                t["datatype"] = "FP32"
    msg = pb.ModelInferRequest(model_name=model, model_version=version)
    for t in inputs:
        it = msg.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if t["contents"] is not None:
            it.contents.SetInParent()
            for field, values in t["contents"].items():
                getattr(it.contents, field).extend(values)
    if raw is not None:
        msg.raw_input_contents.extend(raw)
    try:
        req = gcodec.decode_infer(msg, 1000)
    except ServingError as e:
        assert e.message
        event("refused")
        return
    event("decoded")
    for t in req.inputs:
        assert t.data.shape == tuple(t.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name", "x"]), _json, max_size=3)
       | st.fixed_dictionaries({"instances": st.lists(
           st.lists(st.floats(allow_nan=True) | st.integers(-9, 9) | st.text(max_size=2), max_size=66)
           | st.dictionaries(st.sampled_from(["input", "ids", "x"]), _json, max_size=2), max_size=4)}),
       two=st.booleans())
def test_fuzz_tfserving_decode_predict(doc, two):
    from runtime.protocol import tfserving_rest as tfs
    from runtime.types import TensorSpec
    specs = (TensorSpec("input", "FP32", (-1, 64)),)
    if two:
        specs += (TensorSpec("ids", "INT64", (-1, 3)), TensorSpec("text", "BYTES", (-1,)))
    try:
        parsed = tfs.parse_request(json.dumps(doc).encode())
        req, fmt = tfs.decode_predict(parsed, "mlp", specs, 1000)
    except ServingError as e:
        assert e.message
        event("refused")
        return
    event("decoded")
    for t in req.inputs:
        assert t.data.shape == tuple(t.shape)


@pytest.mark.slow
def test_schemathesis_no_500(tmp_path_factory, version_cache):
    """Every operation of the live OpenAPI schema, fuzzed: never a 5xx other than 503
    (a model unloaded by a fuzzed unload call is UNAVAILABLE, which is honest)."""
    schemathesis = pytest.importorskip("schemathesis")
    import shutil

    import make_example_models as mk
    from runtime.config.settings import Settings

    base = tmp_path_factory.mktemp("schemathesis")
    repo = base / "repo"
    mk.write_model_folder(repo / "mlp", MLP_YAML)
    shutil.copytree(version_cache / "st1", repo / "mlp" / "1")
    s = Settings()
    s.server.http_port = 0
    s.server.grpc_port = 0
    s.server.drain_timeout_s = 2
    s.repository.path = repo
    s.repository.quiet_s = 0.2
    s.limits.max_body_bytes = MAX_BODY
    s.limits.max_elements = MAX_ELEMENTS
    server = LiveServer(s)
    try:
        schema = schemathesis.openapi.from_url(server.http + "/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) >= 10, [o.label for o in ops]
        seen: dict[str, list[int]] = {}
        bad: list[str] = []
        import requests

        session = requests.Session()
        for op in ops:
            @settings(max_examples=8, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case):
                resp = case.call(base_url=server.http, session=session, timeout=30)
                seen.setdefault(op.label, []).append(resp.status_code)
                if resp.status_code >= 500 and resp.status_code != 503:
                    bad.append(f"{op.label} {case.path_parameters} {case.query} -> "
                               f"{resp.status_code} {resp.text[:200]}")
            run()
        total = sum(len(v) for v in seen.values())
        print(f"\n  schemathesis: {len(ops)} operations, {total} requests, "
              f"status codes {sorted({c for v in seen.values() for c in v})}")
        assert not bad, bad[:10]
        assert wait_until(lambda: server.core.manager.models.get("mlp") is not None, 5)
    finally:
        server.stop()
