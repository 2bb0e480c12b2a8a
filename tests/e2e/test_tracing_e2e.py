"""OpenTelemetry traces of live requests reach a real OTLP/HTTP receiver on loopback: one
predict through REST (v2 and TF Serving) and one through gRPC ModelInfer (both transports)
each arrive as the caller's trace, with the request span, its route, queue, batch and
forward children, the attributes the issue names and a shadow copy's span. The caller's
`x-request-id` is the request id on every path. Every wait is on the spans received."""

from __future__ import annotations

import functools
import secrets

import grpc
import httpx
import numpy as np
import orjson
import pytest

from conftest import MLP_YAML, wait_until
from otlp_receiver import OtlpReceiver  # tools/
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc

pytest.importorskip("opentelemetry.sdk.trace")

TRANSPORTS = {"h2": {"grpc_transport": "h2"}, "grpc.aio": {"grpc_transport": "grpcio"}}
BATCHED = MLP_YAML.replace("enabled: false", "enabled: true")
assert BATCHED != MLP_YAML
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
V2_BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                    "data": X.ravel().tolist()}]})
SERVER = 2  # SpanKind SERVER in the OTLP protobuf


@pytest.fixture
def receiver(monkeypatch):
    r = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "splitserve-e2e")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not 5 s
    yield r
    r.stop()


@pytest.fixture(params=list(TRANSPORTS))
def traced(request, make_repo, serve, tmp_path, receiver):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": BATCHED})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n    weights: {stable: 100}\n"
                   "    shadow: {target: canary, percent: 100}\n")
    srv = serve(repo, config=cfg, **TRANSPORTS[request.param])
    assert srv.available("mlp") == [1, 2]
    assert srv.core.tracing is not None
    return srv, receiver


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    tid, sid = secrets.token_hex(16), secrets.token_hex(8)
    return tid, sid, f"00-{tid}-{sid}-{'01' if sampled else '00'}"


def spans_named(rec: OtlpReceiver, tid: str, names: set[str]) -> dict:
    """name -> span once the trace holds all of `names` (the shadow span ends last)."""
    got = {s.name: s for s in rec.trace(tid)}
    return got if names <= set(got) else {}


def check_request_trace(rec, tid, caller_span, name, rid, *, shadow=True):
    want = {name, "route", "queue", "batch", "forward"} | ({"shadow"} if shadow else set())
    assert wait_until(lambda: spans_named(rec, tid, want), 30), [s.name for s in rec.trace(tid)]
    spans = spans_named(rec, tid, want)
    root = spans[name]
    assert root.kind == SERVER and root.parent_id == caller_span  # the caller's trace, continued
    assert root.resource["service.name"] == "splitserve-e2e"
    a = root.attributes
    assert (a["splitserve.model"], a["splitserve.version"], a["splitserve.route"],
            a["splitserve.code"], a["splitserve.batch_size"], a["splitserve.request_id"]) == \
        ("mlp", 1, "split", "OK", 1, rid)
    for child in ("route", "queue", "batch"):
        assert spans[child].parent_id == root.span_id, child
    assert spans["forward"].parent_id == spans["batch"].span_id
    assert spans["batch"].attributes["splitserve.batch_size"] == 1
    assert root.start_ns <= spans["route"].start_ns <= spans["queue"].start_ns <= spans["forward"].start_ns
    assert spans["forward"].end_ns <= root.end_ns
    if shadow:
        assert ("shadow_copy", {"splitserve.shadow_version": 2}) in root.events
        sh = spans["shadow"]
        assert sh.parent_id == root.span_id and sh.attributes["splitserve.code"] == "OK"
        assert ("served", {"splitserve.version": 2}) in sh.events
    return spans


def test_a_rest_and_a_grpc_predict_reach_the_otlp_receiver(traced):
    srv, rec = traced
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        # not sampled by the caller: parent-based sampling keeps it out of the export
        dropped, _, tp = traceparent(sampled=False)
        assert c.post("/v2/models/mlp/infer", content=V2_BODY, headers={"traceparent": tp}).status_code == 200

        tid, sid, tp = traceparent()
        r = c.post("/v2/models/mlp/infer", content=V2_BODY,
                   headers={"traceparent": tp, "x-request-id": "mesh-7f3a.9:1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "mesh-7f3a.9:1"
        assert r.json()["id"] == "mesh-7f3a.9:1"
        check_request_trace(rec, tid, sid, "POST /v2/models/{model}/infer", "mesh-7f3a.9:1")

        tid, sid, tp = traceparent()
        r = c.post("/v1/models/mlp:predict", json={"instances": X.tolist()},
                   headers={"traceparent": tp, "x-request-id": "tfs-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "tfs-1"
        check_request_trace(rec, tid, sid, "POST /v1/models/{model}:predict", "tfs-1")

        # a refused request is traced with its code (and no version ran it)
        tid, sid, tp = traceparent()
        bad = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                                        "data": [1, 2, 3]}]})
        assert c.post("/v2/models/mlp/infer", content=bad, headers={"traceparent": tp}).status_code == 400
        assert wait_until(lambda: spans_named(rec, tid, {"POST /v2/models/{model}/infer"}), 30)
        assert spans_named(rec, tid, {"POST /v2/models/{model}/infer"})[
            "POST /v2/models/{model}/infer"].attributes["splitserve.code"] == "INVALID_ARGUMENT"

    tid, sid, tp = traceparent()
    ch = grpc.insecure_channel(srv.grpc)
    try:
        req = pb.ModelInferRequest(
            model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[1, 64])], raw_input_contents=[X.tobytes()])
        resp, call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.with_call(
            req, metadata=(("traceparent", tp), ("x-request-id", "grpc-abc")), timeout=30)
    finally:
        ch.close()
    assert resp.id == "grpc-abc" and dict(call.trailing_metadata())["x-request-id"] == "grpc-abc"
    spans = check_request_trace(rec, tid, sid, "inference.GRPCInferenceService/ModelInfer", "grpc-abc")
    assert spans["inference.GRPCInferenceService/ModelInfer"].attributes["rpc.system"] == "grpc"
    assert rec.trace(dropped) == []  # exported in order: had it been sampled, it would be here


def test_an_experiment_request_carries_its_arm(make_repo, serve, tmp_path, receiver):
    from test_experiment_e2e import body, config_text, experiment

    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text())
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}), cfg)
    assert wait_until(lambda: experiment(srv)["decisions"][:1] and experiment(srv)["candidate_weight"] == 50, 30)
    arms = {}
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        for i in range(12):  # sticky users: both arms come up
            tid, _, tp = traceparent()
            r = c.post("/v2/models/mlp/infer", content=body(False), headers={
                "traceparent": tp, "x-user-id": f"user-{i}", "content-type": "application/json"})
            assert r.status_code == 200
            arms[tid] = r.headers["x-model-version"]
    name = "POST /v2/models/{model}/infer"
    assert wait_until(lambda: all(spans_named(receiver, t, {name}) for t in arms), 30)
    for tid, version in arms.items():
        a = spans_named(receiver, tid, {name})[name].attributes
        assert a["splitserve.route"] == "sticky"
        assert a["splitserve.arm"] == {"1": "control", "2": "candidate"}[version]
    assert set(arms.values()) == {"1", "2"}
