"""Scenario 7: overload.

A slow model (forward sleeps DELAY s, one executor thread per version). More concurrent
requests than the server admits -- by `limits.max_inflight`, or by a batcher's
`max_queue_size` -- are refused fast with 429 + Retry-After (REST) / RESOURCE_EXHAUSTED (gRPC); the
admitted ones complete with a latency bounded by the work admitted ahead of them; when
the load drops the server answers everything again.
"""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from reliability_helpers import BODY, X, percentile, wait_until, write_slow_model
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
DELAY = 0.3
GRPC_REQ = pb.ModelInferRequest(
    model_name="slow", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[2, 64])], raw_input_contents=[X.tobytes()])


def burst(srv, n_rest: int, n_grpc: int) -> list[tuple[str, object, float, str]]:
    """Fire n_rest + n_grpc requests at once -> [(proto, status, latency, message)]."""
    out, lock = [], threading.Lock()
    barrier = threading.Barrier(n_rest + n_grpc)
    clients = [httpx.Client(base_url=srv.http, timeout=60) for _ in range(n_rest)]
    channels = [grpc.insecure_channel(srv.grpc) for _ in range(n_grpc)]
    for c in clients:  # connect first, so the burst measures the server, not TCP setup
        assert c.get("/v2/health/live").status_code == 200
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=10)

    def rest(c):
        barrier.wait()
        t0 = time.monotonic()
        r = c.post("/v2/models/slow/infer", json=BODY)
        msg = r.json().get("error", "") if r.status_code != 200 else ""
        with lock:
            out.append(("rest", r.status_code, time.monotonic() - t0, msg))

    def rpc(ch):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        barrier.wait()
        t0 = time.monotonic()
        try:
            stub.ModelInfer(GRPC_REQ, timeout=60)
            code, msg = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, msg = e.code(), e.details()
        with lock:
            out.append(("grpc", code, time.monotonic() - t0, msg))

    threads = [threading.Thread(target=rest, args=(c,)) for c in clients]
    threads += [threading.Thread(target=rpc, args=(ch,)) for ch in channels]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    for ch in channels:
        ch.close()
    return out


def summarize(name: str, results) -> tuple[list, list]:
    ok = [r for r in results if r[1] in (200, grpc.StatusCode.OK)]
    refused = [r for r in results if r not in ok]
    print(f"\n  {name}: {len(results)} concurrent ({sum(r[0] == 'rest' for r in results)} REST, "
          f"{sum(r[0] == 'grpc' for r in results)} gRPC): {len(ok)} admitted, {len(refused)} refused; "
          f"refused latency p50 {percentile([r[2] for r in refused], 50) * 1e3:.0f} ms max "
          f"{max([r[2] for r in refused], default=0) * 1e3:.0f} ms; admitted latency max "
          f"{max([r[2] for r in ok], default=0):.2f} s")
    return ok, refused


def recovered(srv, n: int = 10) -> None:
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        for _ in range(n):
            r = c.post("/v2/models/slow/infer", json=BODY)
            assert r.status_code == 200, r.text
    with grpc.insecure_channel(srv.grpc) as ch:
        assert pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(GRPC_REQ, timeout=30).model_version == "1"


def test_over_max_inflight_is_refused_fast(make_repo, serve):
    repo = make_repo({})
    write_slow_model(repo, "slow", delay=DELAY)
    limit = 4
    srv = serve(repo, max_inflight=limit)
    assert srv.grpc is not None
    recovered(srv, 1)
    results = burst(srv, 16, 6)
    ok, refused = summarize(f"max_inflight={limit}", results)
    assert len(ok) >= limit and len(refused) >= 10
    for proto, code, _, msg in refused:
        assert code == (429 if proto == "rest" else grpc.StatusCode.RESOURCE_EXHAUSTED), (proto, code, msg)
        assert "limit" in msg and str(limit) in msg, msg
    assert max(r[2] for r in refused) < 1.0, "refusals were not fast"
    # admitted requests ran one after another: bounded by the work admitted ahead of them
    assert max(r[2] for r in ok) < (len(ok) + 1) * DELAY + 1.5
    assert wait_until(lambda: srv.core.inference.inflight == 0, 10)
    recovered(srv)
    # a second wave after recovery behaves the same way (nothing leaked in the counters)
    ok2, refused2 = summarize("second wave", burst(srv, 12, 0))
    assert len(ok2) >= limit and refused2
    recovered(srv)


def test_over_batch_queue_is_refused_fast(make_repo, serve):
    repo = make_repo({})
    write_slow_model(repo, "slow", delay=DELAY, extra_yaml=(
        "batching: {enabled: true, exact: true, max_queue_size: 2, max_queue_delay_us: 0}"))
    yaml_path = repo / "slow" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("max_batch_size: 8", "max_batch_size: 2"))
    srv = serve(repo)
    h = srv.core.manager.models["slow"].serving[1].runner
    assert h.batcher is not None
    assert wait_until(lambda: bool(h.batcher.row_multiple), 30), "batch calibration never ended"
    recovered(srv, 1)
    results = burst(srv, 12, 6)
    ok, refused = summarize("batch queue max_queue_size=2, max_batch_size=2", results)
    assert len(ok) >= 3 and len(refused) >= 8
    for proto, code, _, msg in refused:
        assert code == (429 if proto == "rest" else grpc.StatusCode.RESOURCE_EXHAUSTED), (proto, code, msg)
        assert "queue" in msg and "full" in msg, msg
    assert max(r[2] for r in refused) < 1.0
    # at most one running batch + one queued batch of 2 ahead of any admitted request
    assert max(r[2] for r in ok) < 4 * DELAY + 1.5
    assert h.batcher.stats.rejected >= len(refused)
    assert wait_until(lambda: h.batcher.queued == 0, 10)
    recovered(srv)
    np.testing.assert_array_equal(srv.available("slow"), [1])
