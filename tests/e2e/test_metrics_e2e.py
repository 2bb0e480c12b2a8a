"""Metrics on a live server: exact counts in the A/B summary, Prometheus text, Triton
statistics (raw and through tritonclient), and state/memory figures across an unload."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MLP_YAML

N1, N2, BAD2, B2 = 7, 5, 2, 3  # requests to v1 (batch 1), to v2 (batch B2), failing on v2


def _body(batch: int, name: str = "input") -> dict:
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": [batch, 64],
                        "data": x.ravel().tolist()}]}


def _prom(http: str) -> dict:
    r = httpx.get(f"{http}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _samples(fam, suffix: str = "") -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples
            if s.name == fam.name + suffix}


@pytest.fixture
def srv(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1", 2: "pt2_2"}},
                     yaml={"mlp": MLP_YAML.replace("{latest: 1}", "all")})
    s = serve(repo)
    assert s.available("mlp") == [1, 2]
    with httpx.Client(base_url=s.http, timeout=30) as c:
        for _ in range(N1):
            assert c.post("/v2/models/mlp/versions/1/infer", json=_body(1)).status_code == 200
        for _ in range(N2):
            r = c.post("/v2/models/mlp/versions/2/infer", json=_body(B2))
            assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        for _ in range(BAD2):  # routed to version 2, refused by its signature: a client error
            assert c.post("/v2/models/mlp/versions/2/infer", json=_body(1, "wrong")).status_code == 400
        # never reaches a version (404 or 503 by the router's verdict): version label ""
        assert c.post("/v2/models/nope/infer", json=_body(1)).status_code in (404, 503)
    return s


def test_ab_summary_counts_are_exact(srv):
    r = httpx.get(f"{srv.http}/v1/models/mlp/metrics")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "mlp" and doc["window_s"] == 60
    rows = {v["version"]: v for v in doc["versions"]}
    assert set(rows) == {"1", "2"}
    v1, v2 = rows["1"], rows["2"]
    assert (v1["requests"], v1["errors"], v1["error_rate"]) == (N1, 0, 0.0)
    # client mistakes are never charged to a version (issue 11): they are client_errors
    assert (v2["requests"], v2["errors"], v2["error_rate"]) == (N2, 0, 0.0)
    assert doc["client_errors"] == BAD2
    assert v1["recent"]["requests"] == N1 and v2["recent"]["errors"] == 0
    for v in (v1, v2):
        assert v["state"] == "AVAILABLE" and v["memory_bytes"] > 0
        assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p90"] <= v["latency_ms"]["p99"]
        assert v["shadow"] is None and v["observed_share"] is None  # all pinned
    assert v2["mean_batch_size"] == pytest.approx(B2)
    assert v2["effective_weight"] == 100 and v1["effective_weight"] == 0  # newest takes all
    assert v2["expected_share"] == 1.0
    assert httpx.get(f"{srv.http}/v1/models/nope/metrics").status_code == 404


def test_prometheus_text(srv):
    fams = _prom(srv.http)
    req = _samples(fams["splitserve_requests"], "_total")

    def key(version, code, route="pinned", model="mlp"):
        return tuple(sorted({"model": model, "version": version, "route": route,
                             "protocol": "rest_v2", "code": code}.items()))

    assert req[key("1", "OK")] == N1
    assert req[key("2", "OK")] == N2
    assert req[key("", "INVALID_ARGUMENT")] == BAD2  # no version ran them
    # a model nobody serves is counted under one fixed label: names can't grow the label set
    assert not [k for k in req if dict(k)["model"] == "nope"]
    nope = [(dict(k), n) for k, n in req.items() if dict(k)["model"] == "_unknown"]
    assert [(d["version"], d["route"], n) for d, n in nope] == [("", "unrouted", 1)]
    assert sum(req.values()) == N1 + N2 + BAD2 + 1
    dur = _samples(fams["splitserve_request_duration_seconds"], "_count")
    assert dur[(("model", "mlp"), ("route", "pinned"), ("version", "1"))] == N1
    batch = _samples(fams["splitserve_batch_size"], "_sum")
    assert batch[(("model", "mlp"), ("version", "2"))] == N2 * B2
    states = _samples(fams["splitserve_version_state"])
    assert states[(("model", "mlp"), ("state", "AVAILABLE"), ("version", "2"))] == 1
    mem = _samples(fams["splitserve_version_memory_bytes"])
    assert mem[(("model", "mlp"), ("version", "1"))] > 0
    assert _samples(fams["splitserve_version_load_seconds"])[(("model", "mlp"), ("version", "1"))] > 0
    assert _samples(fams["splitserve_inflight_requests"])[(("model", "mlp"), ("version", "1"))] == 0


def test_triton_statistics(srv):
    r = httpx.get(f"{srv.http}/v2/models/mlp/stats")
    assert r.status_code == 200, r.text
    stats = {s["version"]: s for s in r.json()["model_stats"]}
    assert set(stats) == {"1", "2"}
    s1, s2 = stats["1"], stats["2"]
    assert s1["name"] == "mlp" and s1["inference_count"] == N1 and s1["execution_count"] == N1
    assert s2["inference_count"] == N2 * B2 and s2["execution_count"] == N2
    assert s2["inference_stats"]["success"]["count"] == N2
    assert s2["inference_stats"]["fail"]["count"] == 0  # client errors are not the version's
    assert s2["inference_stats"]["success"]["ns"] > 0 and s2["last_inference"] > 1.6e12
    assert s2["batch_stats"][0]["batch_size"] == B2
    assert s2["batch_stats"][0]["compute_infer"]["count"] == N2
    assert s1["memory_usage"] and s1["memory_usage"][0]["byte_size"] > 0

    one = httpx.get(f"{srv.http}/v2/models/mlp/versions/2/stats").json()["model_stats"]
    assert one == [s2] or (len(one) == 1 and one[0]["inference_count"] == N2 * B2)
    assert httpx.get(f"{srv.http}/v2/models/mlp/versions/9/stats").status_code == 404
    assert httpx.get(f"{srv.http}/v2/models/nope/stats").status_code == 404
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url=srv.http.removeprefix("http://"))
    try:
        got = client.get_inference_statistics("mlp")
        assert {s["version"]: s["inference_count"] for s in got["model_stats"]} == {
            "1": N1, "2": N2 * B2}
        got = client.get_inference_statistics("mlp", "1")
        assert [s["execution_count"] for s in got["model_stats"]] == [N1]
    finally:
        client.close()


def test_triton_statistics_for_every_model(srv):
    every = httpx.get(f"{srv.http}/v2/models/stats")
    assert every.status_code == 200, (
        f"{every.text}: /v2/models/stats must be routed before /v2/models/{{model}} "
        "(app.py includes rest_metrics ahead of rest_v2)")
    assert {(s["name"], s["version"]) for s in every.json()["model_stats"]} == {("mlp", "1"), ("mlp", "2")}
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url=srv.http.removeprefix("http://"))
    try:
        got = client.get_inference_statistics()
        assert sum(s["inference_count"] for s in got["model_stats"]) == N1 + N2 * B2
    finally:
        client.close()


def test_state_and_memory_change_on_unload(srv):
    r = httpx.post(f"{srv.http}/v2/repository/models/mlp/unload")
    assert r.status_code == 200, r.text
    assert srv.wait_for(lambda: not srv.core.manager.models["mlp"].harnesses)
    doc = httpx.get(f"{srv.http}/v1/models/mlp/metrics").json()
    rows = {v["version"]: v for v in doc["ended"]}
    assert set(rows) == {"1", "2"} and doc["versions"] == []  # they had traffic: listed apart, exact
    for v in rows.values():
        assert v["state"] == "END" and v["memory_bytes"] == 0
    assert rows["1"]["requests"] == N1 and rows["2"]["requests"] == N2
    fams = _prom(srv.http)
    states = _samples(fams["splitserve_version_state"])
    for v in ("1", "2"):
        assert states[(("model", "mlp"), ("state", "END"), ("version", v))] == 1
        assert states[(("model", "mlp"), ("state", "AVAILABLE"), ("version", v))] == 0
        assert _samples(fams["splitserve_version_memory_bytes"])[(("model", "mlp"), ("version", v))] == 0
    stats = httpx.get(f"{srv.http}/v2/models/mlp/stats").json()["model_stats"]
    assert all(s["memory_usage"] == [] for s in stats)
    assert sum(s["inference_count"] for s in stats) == N1 + N2 * B2
