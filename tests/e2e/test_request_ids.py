"""Request ids from the caller, on a live server over real HTTP: an `x-request-id` (or the
v2 request's `id`) of a safe alphabet and bounded length is the request id, echoed and
joined on by feedback in an experiment; an unsafe one is replaced by a made id; a second
request with a remembered id is counted in the experiment report, not silently merged."""

from __future__ import annotations

import re

import httpx
import orjson

from conftest import wait_until
from test_experiment_e2e import AUTH, TOKEN, body, config_text, experiment, repo  # noqa: F401

MADE = re.compile(r"[0-9a-f]{16}")


def test_a_callers_request_id_joins_feedback(repo, tmp_path, serve):  # noqa: F811
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text())
    srv = serve(repo, cfg, token=TOKEN)
    assert wait_until(lambda: experiment(srv)["decisions"][:1] and experiment(srv)["candidate_weight"] == 50, 30)
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        def infer(headers=None, content=None):
            r = c.post("/v2/models/mlp/infer", content=content or body(False),
                       headers={"content-type": "application/json", **(headers or {})})
            assert r.status_code == 200, r.text
            assert r.json()["id"] == r.headers["x-request-id"]
            return r.headers["x-request-id"], r.headers["x-model-version"]

        mesh = "0f8fad5b-d9cb-469f-a165-70867728950e"  # what Envoy / Istio put there
        assert infer({"x-request-id": mesh, "x-user-id": "u1"})[0] == mesh
        doc = orjson.loads(body(False))
        doc["id"] = "client:42"  # the v2 request's own id is the request id too
        assert infer({"x-user-id": "u2"}, orjson.dumps(doc))[0] == "client:42"
        for unsafe in ("has space", "x" * 129, "semi;colon", "ünï"):
            rid, _ = infer({"x-request-id": unsafe.encode(), "x-user-id": "u3"})
            assert MADE.fullmatch(rid), (unsafe, rid)  # replaced, not refused
        assert experiment(srv)["duplicate_request_ids"] == 0

        r = c.post("/v1/models/mlp/feedback", headers=AUTH, json={"items": [
            {"request_id": mesh, "metric": "click", "value": 1},
            {"request_id": "client:42", "metric": "click", "value": 0}]})
        assert r.status_code == 200 and r.json() == {"matched": 2, "unknown": 0, "duplicate": 0}

        # the same caller id again: served, counted, and the first request keeps the feedback
        assert infer({"x-request-id": mesh, "x-user-id": "u4"})[0] == mesh
        assert experiment(srv)["duplicate_request_ids"] == 1
        r = c.post("/v1/models/mlp/feedback", headers=AUTH,
                   json={"items": [{"request_id": mesh, "metric": "click", "value": 1}]})
        assert r.json() == {"matched": 0, "unknown": 0, "duplicate": 1}


def test_grpc_metadata_ids_and_streams(make_repo, serve):
    """ModelInfer takes the x-request-id metadata; on a stream it names the stream, so each
    message without its own id gets a made one (never one id for many requests)."""
    import grpc
    import numpy as np

    from runtime.protocol.pb import grpc_service_pb2 as pb
    from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc

    srv = serve(make_repo({"mlp": {1: "st1"}}))
    x = np.zeros((1, 64), np.float32)

    def req(**kw):
        return pb.ModelInferRequest(model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 64])], raw_input_contents=[x.tobytes()], **kw)

    with grpc.insecure_channel(srv.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        resp, call = stub.ModelInfer.with_call(req(), metadata=(("x-request-id", "grpc-1"),), timeout=30)
        assert resp.id == "grpc-1" and dict(call.trailing_metadata())["x-request-id"] == "grpc-1"
        resp = stub.ModelInfer(req(), metadata=(("x-request-id", "no/slash"),), timeout=30)
        assert MADE.fullmatch(resp.id)
        got = [r.infer_response.id for r in stub.ModelStreamInfer(
            iter([req(), req(), req(id="own-3")]), metadata=(("x-request-id", "stream-1"),), timeout=30)]
    assert got[2] == "own-3" and len(set(got)) == 3 and all(MADE.fullmatch(i) for i in got[:2]), got
