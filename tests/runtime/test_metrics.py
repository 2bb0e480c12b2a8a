"""Metrics: exact counts, percentiles from buckets, the recent window (injected clock),
shadow figures, Triton statistics shape, Prometheus text from the custom collector."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import RouteConfig, Router
from runtime.errors import Code, ServingError
from runtime.histogram import EDGES, EXPORT_BOUNDS, quantile
from runtime.metrics.facade import Metrics
from runtime.metrics.prometheus import BATCH_BOUNDS
from runtime.types import VersionState
from runtime.views import LifecycleEvent, ModelView, Snapshot, VersionView

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def ok(m, version=1, route="pinned", latency=0.01, queue=0.0, compute=0.005, batch=1,
       model="m", protocol="rest_v2"):
    m.record_request(model, version, route, protocol, "OK", latency, queue, compute, batch)


def fail(m, version=1, route="pinned", code="INVALID_ARGUMENT", latency=0.001, model="m"):
    m.record_request(model, version, route, "rest_v2", code, latency, 0.0, 0.0, 0)


def version(v, state=VersionState.AVAILABLE, memory=1000, error=None) -> VersionView:
    loaded = state in (VersionState.AVAILABLE, VersionState.UNLOADING)
    return VersionView(v, state, error, 0.0, None, "model.pt2" if loaded else None,
                       "cpu" if loaded else None, memory if loaded else 0)


class Views:
    """A hand-built published view: what the manager would publish (no manager needed)."""

    def __init__(self, *versions, model="m", inflight=None):
        self.model = model
        self.inflight = dict(inflight or {})
        self.set(*versions)

    def set(self, *versions):
        mv = ModelView(self.model, tuple(sorted(versions, key=lambda x: x.version)))
        self.snap = Snapshot(1, {self.model: mv}, lambda m, v: self.inflight.get(v, 0))

    def __call__(self) -> Snapshot:
        return self.snap


def event(kind, v, model="m", error=None):
    return LifecycleEvent(kind, model, v, error, 0.25 if kind == "loaded" else None,
                          0.05 if kind == "loaded" else None,
                          "cpu" if kind == "loaded" else None, 4096 if kind == "loaded" else 0)


def prom(m) -> dict:
    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


# ---- exact counts ---------------------------------------------------------------------
def test_counts_are_exact_per_version_route_protocol_code():
    m = Metrics(Router(), clock=Clock())
    for _ in range(37):
        ok(m, 1)
    for _ in range(11):
        ok(m, 2, batch=4)
    for _ in range(3):
        fail(m, 2)
    fail(m, None, route="unrouted", code="NOT_FOUND")
    ok(m, 2, route="shadow")
    s = {v["version"]: v for v in m.summary("m")["versions"]}
    assert (s["1"]["requests"], s["1"]["errors"]) == (37, 0)
    assert (s["2"]["requests"], s["2"]["errors"]) == (14, 3)  # shadow not counted as primary
    assert s["2"]["error_rate"] == round(3 / 14, 4)  # rates and shares: 4 digits
    assert s["1"]["error_rate"] == 0.0
    fams, _ = prom(m)
    samples = {tuple(sorted(x.labels.items())): x.value for x in fams["splitserve_requests"].samples
               if x.name == "splitserve_requests_total"}
    key = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
    assert samples[key(model="m", version="1", route="pinned", protocol="rest_v2", code="OK")] == 37
    assert samples[key(model="m", version="2", route="pinned", protocol="rest_v2", code="OK")] == 11
    assert samples[key(model="m", version="2", route="pinned", protocol="rest_v2",
                       code="INVALID_ARGUMENT")] == 3
    assert samples[key(model="m", version="", route="unrouted", protocol="rest_v2",
                       code="NOT_FOUND")] == 1
    assert samples[key(model="m", version="2", route="shadow", protocol="rest_v2", code="OK")] == 1
    assert sum(samples.values()) == 37 + 11 + 3 + 1 + 1


def test_unknown_model_is_not_found():
    m = Metrics(Router())
    fail(m, None, route="unrouted", code="NOT_FOUND", model="nope")  # no version: not "known"
    for call in (lambda: m.summary("nope"), lambda: m.statistics("nope")):
        with pytest.raises(ServingError) as ei:
            call()
        assert ei.value.code is Code.NOT_FOUND
    ok(m, 1)
    with pytest.raises(ServingError) as ei:
        m.statistics("m", 9)
    assert ei.value.code is Code.NOT_FOUND


def test_unknown_model_names_share_one_label():
    m = Metrics(Router(), views=Views(version(1)))
    for name in ("a", "b", "c"):
        fail(m, None, route="unrouted", code="NOT_FOUND", model=name)
    fail(m, None, route="unrouted", code="UNAVAILABLE")  # a known model keeps its name
    fams, _ = prom(m)
    got = {(x.labels["model"], x.labels["code"]): x.value for x in fams["splitserve_requests"].samples
           if x.name == "splitserve_requests_total"}
    assert got == {("_unknown", "NOT_FOUND"): 3, ("m", "UNAVAILABLE"): 1}


# ---- percentiles ----------------------------------------------------------------------
@pytest.mark.parametrize("sample", [
    lambda rng: rng.lognormal(np.log(0.004), 0.6, 20000),       # ms-scale, skewed
    lambda rng: rng.uniform(0.001, 0.050, 20000),
    lambda rng: 0.0002 + rng.exponential(0.0008, 20000),        # sub-ms
])
def test_percentiles_from_buckets_within_a_few_percent(sample):
    xs = sample(np.random.default_rng(7))
    m = Metrics(Router(), clock=Clock())
    for x in xs:
        ok(m, 1, latency=float(x))
    lat = m.summary("m")["versions"][0]["latency_ms"]
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        want = np.percentile(xs, q) * 1e3
        assert lat[name] == pytest.approx(want, rel=0.03), name


def test_quantile_interpolates_inside_a_bucket():
    counts = [0] * (len(EDGES) + 1)
    i = EDGES.index(0.01)
    counts[i] = 100  # 100 values in (EDGES[i-1], 0.01]
    lo = EDGES[i - 1]
    assert quantile(counts, 0.5) == pytest.approx(lo + (0.01 - lo) * 0.5)
    assert quantile(counts, 1.0) == pytest.approx(0.01)
    assert quantile([0] * len(counts), 0.5) is None
    # fine buckets are narrow: about 4.9 % wide
    widths = [b / a for a, b in zip(EDGES, EDGES[1:])]
    assert max(widths) < 1.06 and set(EXPORT_BOUNDS) <= set(EDGES)


# ---- the recent window ----------------------------------------------------------------
def test_old_requests_fall_out_of_the_recent_window():
    clock = Clock(1000.0)
    m = Metrics(Router(), clock=clock)
    for _ in range(10):
        ok(m, 1, latency=0.100)
    clock.t = 1030.5
    for _ in range(5):
        ok(m, 1, latency=0.002)
    fail(m, 1)

    def v1():
        return m.summary("m")["versions"][0]

    r = v1()["recent"]
    assert (r["requests"], r["errors"]) == (16, 1)
    clock.t = 1060.0  # 1000 is now 60 s old: out
    r = v1()["recent"]
    assert (r["requests"], r["errors"]) == (6, 1)
    assert r["latency_ms"]["p99"] == pytest.approx(2.0, rel=0.05)  # the 100 ms ones are gone
    assert v1()["requests"] == 16 and v1()["latency_ms"]["p99"] == pytest.approx(100, rel=0.05)
    clock.t = 1091.0
    r = v1()["recent"]
    assert (r["requests"], r["errors"], r["error_rate"]) == (0, 0, None)
    assert r["latency_ms"] == {"p50": None, "p90": None, "p99": None}


def test_ring_slot_is_reset_when_reused_a_window_later():
    clock = Clock(100.0)
    m = Metrics(Router(), clock=clock)
    for _ in range(7):
        ok(m, 1)
    clock.t = 160.2  # same slot (160 % 60 == 100 % 60): rotated lazily on this write
    ok(m, 1)
    assert m.summary("m")["versions"][0]["recent"]["requests"] == 1
    assert m.summary("m")["versions"][0]["requests"] == 8


# ---- shares and labels ----------------------------------------------------------------
def test_configured_effective_and_observed_shares():
    router = Router({"m": RouteConfig.from_json({"labels": {"stable": 1, "canary": 2},
                                                 "weights": {"stable": 3, "canary": 1}})})
    router.set_available("m", [1, 2])
    m = Metrics(router, clock=Clock())
    for _ in range(30):
        ok(m, 1, route="split")
    for _ in range(10):
        ok(m, 2, route="sticky")
    for _ in range(50):
        ok(m, 2, route="pinned")  # pinned traffic does not follow the weights
    rows = {v["version"]: v for v in m.summary("m")["versions"]}
    assert rows["1"]["labels"] == ["stable"] and rows["2"]["labels"] == ["canary"]
    assert rows["1"]["label"] == ["stable"]  # the old key, kept for one release
    assert rows["1"]["weight"] == 3 and rows["2"]["weight"] == 1  # the config's units
    assert rows["1"]["effective_weight"] == 3 and rows["1"]["expected_share"] == 0.75
    assert rows["2"]["by_route"] == {"pinned": 50, "sticky": 10} and rows["2"]["routed_requests"] == 10
    assert rows["1"]["observed_share"] == pytest.approx(0.75)
    assert rows["2"]["recent"]["observed_share"] == pytest.approx(0.25)
    assert rows["2"]["requests"] == 60
    fams, _ = prom(m)
    share = {s.labels["version"]: s.value for s in fams["splitserve_traffic_share"].samples}
    weight = {s.labels["version"]: s.value for s in fams["splitserve_routing_weight"].samples}
    assert share == pytest.approx({"1": 0.75, "2": 0.25})
    assert weight == pytest.approx({"1": 0.75, "2": 0.25})


def test_no_weights_configured_means_null_weight():
    router = Router()
    router.set_available("m", [1, 2])
    m = Metrics(router, clock=Clock())
    ok(m, 1)
    ok(m, 2)
    rows = {v["version"]: v for v in m.summary("m")["versions"]}
    assert rows["1"]["weight"] is None and rows["2"]["effective_weight"] == 100  # percent
    assert rows["2"]["expected_share"] == 1.0
    assert rows["1"]["observed_share"] is None  # no weight-routed traffic yet


# ---- shadow ---------------------------------------------------------------------------
def test_shadow_agreement_and_differences():
    m = Metrics(Router(), clock=Clock())
    ok(m, 1, route="split")
    for d, agree in [(0.1, True), (0.3, True), (0.2, False), (0.0, True)]:
        m.record_shadow("m", 1, 2, True, d, agree)
        ok(m, 2, route="shadow")
    m.record_shadow("m", 1, 2, True, None, None)  # nothing comparable
    m.record_shadow("m", 1, 2, False, None, None)  # the shadow run failed
    rows = {v["version"]: v for v in m.summary("m")["versions"]}
    assert rows["1"]["shadow"] is None
    sh = rows["2"]["shadow"]
    assert sh["comparisons"] == 5 and sh["failures"] == 1 and sh["primary_versions"] == ["1"]
    assert sh["argmax_agreement"] == pytest.approx(0.75)
    assert sh["max_abs_diff"] == pytest.approx(0.3)
    assert sh["mean_max_abs_diff"] == pytest.approx(0.15)
    assert rows["2"]["requests"] == 0  # shadow copies are not primary traffic
    fams, _ = prom(m)
    lv = {"model": "m", "primary_version": "1", "version": "2"}
    comp = [s for s in fams["splitserve_shadow_comparisons"].samples if s.name.endswith("_total")]
    assert comp[0].labels == lv and comp[0].value == 5
    assert fams["splitserve_shadow_agreement_ratio"].samples[0].value == pytest.approx(0.75)
    assert fams["splitserve_shadow_max_abs_diff"].samples[0].value == pytest.approx(0.3)


# ---- Triton statistics ----------------------------------------------------------------
def test_statistics_has_tritons_shape_and_counts():
    clock = Clock(50.0)
    m = Metrics(Router(), clock=clock, wall=lambda: 1_700_000_000.0)
    for _ in range(4):
        ok(m, 1, latency=0.010, queue=0.001, compute=0.004, batch=3)
    ok(m, 1, latency=0.010, queue=0.0, compute=0.002, batch=1)
    fail(m, 1, latency=0.5)
    clock.t = 52.0
    st = m.statistics("m")
    assert list(st) == ["model_stats"] and len(st["model_stats"]) == 1
    s = st["model_stats"][0]
    assert set(s) == {"name", "version", "last_inference", "inference_count", "execution_count",
                      "inference_stats", "batch_stats", "memory_usage"}
    assert (s["name"], s["version"]) == ("m", "1")
    assert s["last_inference"] == 1_700_000_000_000 - 2000  # 2 s before the read
    assert s["inference_count"] == 13 and s["execution_count"] == 5
    inf = s["inference_stats"]
    assert set(inf) == {"success", "fail", "queue", "compute_input", "compute_infer",
                        "compute_output", "cache_hit", "cache_miss"}
    assert inf["success"] == {"count": 5, "ns": pytest.approx(50_000_000, abs=2)}
    assert inf["fail"] == {"count": 1, "ns": pytest.approx(500_000_000, abs=2)}
    assert inf["queue"]["count"] == 5 and inf["queue"]["ns"] == pytest.approx(4_000_000, abs=2)
    assert inf["compute_infer"] == {"count": 5, "ns": pytest.approx(18_000_000, abs=2)}
    assert inf["cache_hit"] == {"count": 0, "ns": 0}
    bs = {b["batch_size"]: b for b in s["batch_stats"]}
    assert set(bs) == {1, 3}
    assert bs[3]["compute_infer"]["count"] == 4 and set(bs[3]) == {
        "batch_size", "compute_input", "compute_infer", "compute_output"}
    assert s["memory_usage"] == []
    assert m.statistics("m", "1") == st and m.statistics("m", 1) == st
    assert m.statistics()["model_stats"] == st["model_stats"]


def test_executed_batches_from_a_batcher_replace_request_batches():
    m = Metrics(Router(), clock=Clock())
    for _ in range(8):
        ok(m, 1, batch=1)
    m.record_batch("m", 1, 5, 0.003)
    m.record_batch("m", 1, 3, 0.002)
    s = m.statistics("m")["model_stats"][0]
    assert s["inference_count"] == 8 and s["execution_count"] == 2
    assert [b["batch_size"] for b in s["batch_stats"]] == [3, 5]
    assert m.summary("m")["versions"][0]["mean_batch_size"] == pytest.approx(4.0)


# ---- manager-backed figures: state, memory, in-flight, lifecycle ----------------------
def test_state_memory_inflight_and_lifecycle_from_the_manager():
    bad = version(2, state=VersionState.FAILED, error="no model file")
    views = Views(version(1, memory=4096), bad, inflight={1: 2})
    m = Metrics(Router(), views=views, clock=Clock())
    m.lifecycle_event(event("loaded", 1))
    m.lifecycle_event(event("failed", 2, error="no model file"))
    rows = {v["version"]: v for v in m.summary("m")["versions"]}
    assert rows["1"]["state"] == "AVAILABLE" and rows["1"]["memory_bytes"] == 4096
    assert rows["2"]["state"] == "FAILED" and rows["2"]["reason"] == "no model file"
    assert rows["2"]["load_failures"] == 1 and rows["2"]["memory_bytes"] == 0
    s = m.statistics("m")["model_stats"]
    assert [x["version"] for x in s] == ["1", "2"]
    assert s[0]["memory_usage"] == [{"type": "CPU", "id": 0, "byte_size": 4096}]
    fams, text = prom(m)
    states = {(x.labels["version"], x.labels["state"]): x.value
              for x in fams["splitserve_version_state"].samples}
    assert states[("1", "AVAILABLE")] == 1 and states[("1", "LOADING")] == 0
    assert states[("2", "FAILED")] == 1
    assert {x.labels["version"]: x.value for x in fams["splitserve_inflight_requests"].samples} == {
        "1": 2, "2": 0}
    assert {x.labels["version"]: x.value for x in fams["splitserve_version_memory_bytes"].samples} == {
        "1": 4096, "2": 0}
    assert fams["splitserve_version_load_seconds"].samples[0].value == 0.25
    assert fams["splitserve_version_warmup_seconds"].samples[0].value == 0.05
    failures = [x for x in fams["splitserve_version_load_failures"].samples
                if x.name.endswith("_total")]
    assert [(x.labels, x.value) for x in failures] == [({"model": "m", "version": "2"}, 1)]
    assert "no model file" not in text  # the reason is not a label

    # unloaded: END, no memory, and the version drops out of the summary (no traffic)
    views.set(bad)
    m.lifecycle_event(event("unloaded", 1))
    rows = {v["version"]: v for v in m.summary("m")["versions"]}
    assert set(rows) == {"2"}


# ---- Prometheus text ------------------------------------------------------------------
def test_prometheus_histograms_are_cumulative_and_match_counts():
    m = Metrics(Router(), clock=Clock())
    lats = [0.00005, 0.0003, 0.0007, 0.003, 0.02, 0.2, 3.0, 30.0]
    for x in lats:
        ok(m, 1, latency=x, queue=x / 10, compute=x / 2, batch=2)
    fail(m, 1)
    fams, text = prom(m)
    assert "request_id" not in text
    h = fams["splitserve_request_duration_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in h.samples if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets][:-1] == list(EXPORT_BOUNDS)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    for le, n in buckets:
        assert n == sum(1 for x in lats if x <= le)
    count = [s.value for s in h.samples if s.name.endswith("_count")][0]
    total = [s.value for s in h.samples if s.name.endswith("_sum")][0]
    assert count == len(lats) and total == pytest.approx(sum(lats))  # the failure is not in it
    for name in ("splitserve_queue_duration_seconds", "splitserve_compute_duration_seconds",
                 "splitserve_batch_size"):
        counts = [s.value for s in fams[name].samples if s.name.endswith("_count")]
        assert counts == [len(lats)], name
    b = {s.labels["le"]: s.value for s in fams["splitserve_batch_size"].samples
         if s.name.endswith("_bucket")}
    assert b == {**{f"{float(x)}": (0 if x < 2 else 8) for x in BATCH_BOUNDS}, "+Inf": 8}


def test_batch_size_buckets_never_change_between_scrapes():
    """A fixed `le` set keeps rate() and histogram_quantile() valid (issue 10)."""
    m = Metrics(Router(), clock=Clock())

    def les():
        fams, _ = prom(m)
        return [s.labels["le"] for s in fams["splitserve_batch_size"].samples
                if s.name.endswith("_bucket")]
    ok(m, 1, batch=1)
    first = les()
    ok(m, 1, batch=48)
    ok(m, 1, batch=700)
    assert les() == first == [f"{float(x)}" for x in BATCH_BOUNDS] + ["+Inf"]


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(Router()), Metrics(Router())
    ok(a, 1)
    assert b"splitserve_requests_total{" in generate_latest(a.registry)
    assert b"splitserve_requests_total{" not in generate_latest(b.registry)


def test_record_request_is_cheap():
    m = Metrics(Router())
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        m.record_request("m", 1 + i % 3, "split", "rest_v2", "OK", 0.001 * (1 + i % 50), 0.0,
                         0.0005, 1)
    per = (time.perf_counter() - t0) / n
    assert per < 50e-6  # the bench measures it properly (target < 5 us); this catches blunders


def test_statistics_fit_the_grpc_message_field_for_field():
    json_format = pytest.importorskip("google.protobuf.json_format")
    from runtime.protocol.pb import grpc_service_pb2 as pb

    m = Metrics(Router(), views=Views(version(1, memory=2048)), clock=Clock())
    ok(m, 1, batch=2)
    fail(m, 1)
    st = m.statistics("m")
    msg = json_format.ParseDict(st, pb.ModelStatisticsResponse())  # unknown fields would raise
    s = msg.model_stats[0]
    assert (s.name, s.version, s.inference_count, s.execution_count) == ("m", "1", 2, 1)
    assert s.inference_stats.fail.count == 1 and s.batch_stats[0].batch_size == 2
    assert s.memory_usage[0].byte_size == 2048 and s.memory_usage[0].type == "CPU"


def test_ended_versions_retire_and_model_totals_never_go_down():
    clock = Clock()
    views = Views(version(1), version(2))
    m = Metrics(Router(), views=views, clock=clock, retire_after_s=300)
    for _ in range(5):
        ok(m, 1)
    for _ in range(3):
        ok(m, 2)
    fail(m, 1, code="INTERNAL")

    def totals():
        fams, _ = prom(m)
        return {(s.labels["code"]): s.value for s in fams["splitserve_model_requests"].samples
                if s.name.endswith("_total")}, {
            s.labels["version"] for s in fams["splitserve_requests"].samples}
    assert totals() == ({"OK": 8, "INTERNAL": 1}, {"1", "2"})
    views.set(version(1, state=VersionState.END), version(2))
    m.lifecycle_event(event("unloaded", 1))
    clock.t += 299
    assert totals()[1] == {"1", "2"}  # not yet
    clock.t += 2
    assert totals() == ({"OK": 8, "INTERNAL": 1}, {"2"})  # series gone, totals kept
    assert "1" not in {v["version"] for v in m.summary("m")["versions"]}
    ok(m, 2)
    assert totals()[0] == {"OK": 9, "INTERNAL": 1}


def test_a_version_that_comes_back_before_retirement_keeps_its_series():
    clock = Clock()
    views = Views(version(1))
    m = Metrics(Router(), views=views, clock=clock, retire_after_s=10)
    ok(m, 1)
    views.set(version(1, state=VersionState.END))
    m.lifecycle_event(event("unloaded", 1))
    views.set(version(1))
    m.lifecycle_event(event("loaded", 1))
    clock.t += 60
    assert m.summary("m")["versions"][0]["requests"] == 1


# ---- the A/B summary as a comparison: windows, units, ended versions, the experiment ----
def _routed(weights=None):
    """A router whose config changes reach the metrics' baselines, as Core wires them."""
    router = Router()
    router.set_available("m", [1, 2])
    wall = Clock(5e5)
    m = Metrics(router, clock=Clock(), wall=wall)
    router.subscribe(m.routing_changed)
    router.set_config("m", RouteConfig.from_json({"labels": {"stable": 1, "canary": 2},
                                                  "weights": weights or {"stable": 90, "canary": 10}}))
    return router, m, wall


def test_since_routing_is_the_default_and_leaves_out_traffic_before_the_change():
    router, m, wall = _routed()
    for _ in range(40):
        ok(m, 1, route="split", latency=0.5)  # slow before the change
    fail(m, 2, route="split", code="INTERNAL")
    wall.t += 100
    router.set_config("m", RouteConfig.from_json({"labels": {"stable": 1, "canary": 2},
                                                  "weights": {"stable": 50, "canary": 50}}))
    wall.t += 20
    for _ in range(6):
        ok(m, 1, route="split", latency=0.002)
    for _ in range(4):
        ok(m, 2, route="sticky", latency=0.002)
    doc = m.summary("m")
    assert doc["window"] == {"since": "routing", "from": 5e5 + 100, "from_event": "routing_change",
                             "seconds": 20.0}
    rows = {v["version"]: v for v in doc["versions"]}
    assert (rows["1"]["requests"], rows["2"]["requests"], rows["2"]["errors"]) == (6, 4, 0)
    assert rows["1"]["latency_ms"]["p99"] < 3  # the slow requests were before the change
    assert (rows["1"]["observed_share"], rows["2"]["observed_share"]) == (0.6, 0.4)
    assert rows["1"]["weight"] == 50 and rows["1"]["configured_share"] == 0.5
    whole = {v["version"]: v for v in m.summary("m", "start")["versions"]}
    assert (whole["1"]["requests"], whole["2"]["errors"]) == (46, 1)
    assert m.summary("m", "start")["window"]["from_event"] == "process_start"
    # an identical config is no change: the window stays where it was
    router.set_config("m", router.get_config("m"))
    assert m.summary("m")["window"]["from"] == 5e5 + 100


def test_since_an_epoch_starts_at_the_first_baseline_at_or_after_it():
    router, m, wall = _routed()
    ok(m, 1, route="split")
    wall.t += 30
    m.checkpoint()  # what Core does every CHECKPOINT_S
    for _ in range(3):
        ok(m, 1, route="split")
    wall.t += 5
    doc = m.summary("m", str(5e5 + 12))
    assert doc["window"]["from"] == 5e5 + 30 and doc["window"]["from_event"] == "checkpoint"
    assert doc["versions"][0]["requests"] == 3
    before = m.summary("m", "1")  # before the process started: everything
    assert before["window"]["from_event"] == "process_start" and before["versions"][0]["requests"] == 4


@pytest.mark.parametrize("since", ["yesterday", "-5", "nan", "inf", "1e20"])
def test_a_bad_since_is_one_line_naming_what_is_expected(since):
    _router, m, _wall = _routed()
    ok(m, 1)
    with pytest.raises(ServingError) as e:
        m.summary("m", since)
    assert e.value.code is Code.INVALID_ARGUMENT
    msg = e.value.message
    assert "\n" not in msg and "'routing', 'start' or a unix time in seconds" in msg, msg


def test_ended_versions_are_listed_apart():
    views = Views(version(1), version(2))
    m = Metrics(Router(), views=views, clock=Clock())
    ok(m, 1)
    ok(m, 2)
    views.set(version(1, state=VersionState.END), version(2))
    m.lifecycle_event(event("unloaded", 1))
    doc = m.summary("m")
    assert [v["version"] for v in doc["versions"]] == ["2"]
    assert [(v["version"], v["state"], v["requests"]) for v in doc["ended"]] == [("1", "END", 1)]


def test_the_experiment_block_and_series_come_from_the_published_view():
    from runtime.views import ExperimentsView
    report = {"state": "rolled_back", "step": 1, "candidate_weight": 0.0,
              "guardrails": {"errors": {"evidence": 1.4e3, "alarm": True}},
              "srm": {"p_value": 0.5}, "decisions": []}
    published = [ExperimentsView({"m": report}, {("rollbacks", "m", "errors"): 1,
                                                  ("feedback", "m", "matched"): 7})]
    m = Metrics(Router(), clock=Clock(), experiments=lambda: published[0])
    ok(m, 1)
    assert m.summary("m")["experiment"] == report
    fams, _ = prom(m)
    state = {s.labels["state"]: s.value for s in fams["splitserve_experiment_state"].samples}
    assert state["rolled_back"] == 1 and state["running"] == 0
    assert fams["splitserve_experiment_guardrail_evidence"].samples[0].value == 1.4e3
    assert fams["splitserve_experiment_srm_p_value"].samples[0].value == 0.5
    rb = [s for s in fams["splitserve_experiment_rollbacks"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in rb] == [({"model": "m", "reason": "errors"}, 1)]
    published[0] = ExperimentsView()
    assert m.summary("m")["experiment"]["state"] == "none"
