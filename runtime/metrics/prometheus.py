"""Prometheus text (`/metrics`): every family built from a Store's arrays at scrape time
by one custom collector, so a scrape costs nothing on the hot path and the bucket sets
never change (rate() and histogram_quantile() stay valid across scrapes).

`deploy/grafana/splitserve.json` queries only families defined here (a test reads this
file for them).
"""

from __future__ import annotations

import sys

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from runtime.histogram import EDGES, EXPORT_BOUNDS
from runtime.metrics.merge import reading
from runtime.metrics.store import ROUTED, Store, merge_counts

# Fixed batch-size bounds: a bucket set that never changes keeps rate() and
# histogram_quantile() valid across scrapes.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END", "FAILED")
EXPERIMENT_STATES = ("running", "holding", "paused", "rolled_back", "promoted", "none")

_EXPORT_IDX = [EDGES.index(b) for b in EXPORT_BOUNDS]


def registry(store: Store) -> CollectorRegistry:
    """A registry whose one collector reads `store` (merged with its peers) per scrape;
    more collectors (the mirror's) may be registered beside it."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(store))
    return reg


class _Collector(Collector):
    """Builds every family from the Store's own arrays at scrape time."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        return families(self.store)


def families(store: Store):
    src = reading(store)
    yield _requests_family(src)
    yield _model_totals_family(src)
    yield from _histogram_families(src)
    yield from _version_families(src)
    yield _model_config_family(src)
    yield from _routing_families(src)
    yield from _shadow_families(src)
    yield from _experiment_families(src)
    yield from _cuda_families()


def _requests_family(src: Store):
    f = CounterMetricFamily("splitserve_requests", "Finished requests by the version that "
                            "served them (version empty: never reached one)",
                            labels=["model", "version", "route", "protocol", "code"])
    for (m, v, r, p, c), cell in list(src.cells.items()):
        f.add_metric([m, "" if v is None else str(v), r, p, c], cell.n)
    return f


def _model_totals_family(src: Store):
    f = CounterMetricFamily("splitserve_model_requests", "Finished requests per model, "
                            "ended versions included (never goes down)",
                            labels=["model", "protocol", "code"])
    totals = dict(src.retired)
    for (m, _v, _r, p, c), cell in list(src.cells.items()):
        totals[(m, p, c)] = totals.get((m, p, c), 0) + cell.n
    for (m, p, c), n in sorted(totals.items()):
        f.add_metric([m, p, c], n)
    return f


def _histogram_families(src: Store):
    lat = HistogramMetricFamily("splitserve_request_duration_seconds",
                                "End-to-end latency of successful requests",
                                labels=["model", "version", "route"])
    qf = HistogramMetricFamily("splitserve_queue_duration_seconds",
                               "Time successful requests waited in the version's queue "
                               "(submitted -> forward pass started)",
                               labels=["model", "version"])
    cf = HistogramMetricFamily("splitserve_compute_duration_seconds",
                               "Forward-pass time of successful requests",
                               labels=["model", "version"])
    bf = HistogramMetricFamily("splitserve_batch_size", "Batch sizes executed",
                               labels=["model", "version"])
    for s in list(src.series.values()):
        if s.version is not None and s.n:
            lat.add_metric([s.model, str(s.version), s.route], _buckets(s.lat), s.ok_sum)
    for (m, v), series in sorted(src.by_version.items()):
        if not any(s.n for s in series):
            continue
        lv = [m, str(v)]
        qf.add_metric(lv, _buckets(merge_counts(s.q for s in series)), sum(s.q_sum for s in series))
        cf.add_metric(lv, _buckets(merge_counts(s.c for s in series)), sum(s.c_sum for s in series))
        ex = src.executions(m, v)
        bf.add_metric(lv, _batch_buckets(ex), float(sum(k * b[0] for k, b in ex.items())))
    return lat, qf, cf, bf


def _version_families(src: Store):
    labels = ["model", "version"]
    inflight = GaugeMetricFamily("splitserve_inflight_requests",
                                 "Requests holding a handle on the version", labels=labels)
    state = GaugeMetricFamily("splitserve_version_state",
                              "1 for the version's current lifecycle state",
                              labels=["model", "version", "state"])
    load = GaugeMetricFamily("splitserve_version_load_seconds",
                             "Duration of the version's last load", labels=labels)
    warm = GaugeMetricFamily("splitserve_version_warmup_seconds",
                             "Duration of the version's last warmup", labels=labels)
    mem = GaugeMetricFamily("splitserve_version_memory_bytes",
                            "Parameter and buffer bytes the version holds", labels=labels)
    fails = CounterMetricFamily("splitserve_version_load_failures",
                                "Failed loads (the reason is in the logs and the summary)",
                                labels=labels)
    snap = src.views()
    for model in src.model_names():
        for v, st in sorted(src.statuses(model).items()):
            lv = [model, str(v)]
            for name in STATES:
                state.add_metric(lv + [name], 1.0 if st.state.value == name else 0.0)
            inflight.add_metric(lv, float(snap.inflight(model, v)))
            mem.add_metric(lv, float(st.memory_bytes))
    for (m, v), life in sorted(src.life.items()):
        lv = [m, str(v)]
        if life.load_s is not None:
            load.add_metric(lv, life.load_s)
            warm.add_metric(lv, life.warmup_s or 0.0)
        if life.failures:
            fails.add_metric(lv, life.failures)
    abandoned = GaugeMetricFamily("splitserve_abandoned_loads", "Loads past load_timeout_s "
                                  "whose thread still runs and holds memory")
    abandoned.add_metric([], float(snap.abandoned_loads))
    return inflight, state, load, warm, mem, fails, abandoned


def _model_config_family(src: Store):
    """1 while a model's model.yaml is invalid (the error itself is on the API, not a
    label: GET /v2/models/{m} parameters.model_config_error), 0 once it reads again."""
    f = GaugeMetricFamily("splitserve_model_config_error",
                          "1 while the model's model.yaml is invalid", labels=["model"])
    snap = src.views()
    for model in snap.names():
        f.add_metric([model], 0.0 if snap.model(model).spec_error is None else 1.0)
    return f


def _routing_families(src: Store):
    labels = ["model", "version"]
    eff = GaugeMetricFamily("splitserve_routing_weight",
                            "Effective share of weight-routed traffic the router assigns",
                            labels=labels)
    conf = GaugeMetricFamily("splitserve_routing_configured_weight",
                             "Configured (normalised) weight", labels=labels)
    obs = GaugeMetricFamily("splitserve_traffic_share", "Observed share of weight-routed "
                            f"(split, sticky) requests over the last {src.window_s} s",
                            labels=labels)
    models = set(src.model_names())
    if src.router is not None:
        models.update(src.router.models())
    now_sec = int(src.clock())
    for model in sorted(models):
        configured, effective, _ = src.weights(model)
        for v, w in sorted(effective.items()):
            eff.add_metric([model, str(v)], w)
        total = sum((configured or {}).values())
        for v, w in sorted((configured or {}).items()):
            conf.add_metric([model, str(v)], w / total)
        counts = {}
        for s in src.series.values():
            if s.model == model and s.version is not None and s.route in ROUTED:
                counts[s.version] = counts.get(s.version, 0) + s.window(now_sec, src.window_s)[0]
        total = sum(counts.values())
        if total:
            for v, n in sorted(counts.items()):
                obs.add_metric([model, str(v)], n / total)
    return eff, conf, obs


def _shadow_families(src: Store):
    labels = ["model", "primary_version", "version"]
    comp = CounterMetricFamily("splitserve_shadow_comparisons",
                               "Shadow copies compared with the primary's answer", labels=labels)
    fail = CounterMetricFamily("splitserve_shadow_failures",
                               "Shadow copies that failed", labels=labels)
    agree = GaugeMetricFamily("splitserve_shadow_agreement_ratio",
                              "Share of comparisons whose argmax agreed", labels=labels)
    diff = GaugeMetricFamily("splitserve_shadow_max_abs_diff",
                             "Largest absolute output difference seen", labels=labels)
    dropped = CounterMetricFamily("splitserve_shadow_dropped", "Shadow copies dropped "
                                  "(lane full or version unloading): never run",
                                  labels=["model", "version"])
    for (m, v), n in sorted(src.shadow_dropped.items()):
        dropped.add_metric([m, str(v)], n)
    for (m, p, v), st in sorted(src.shadow.items()):
        lv = [m, str(p), str(v)]
        comp.add_metric(lv, st.n)
        fail.add_metric(lv, st.fails)
        if st.agree_n:
            agree.add_metric(lv, st.agree_yes / st.agree_n)
        if st.diff_max is not None:
            diff.add_metric(lv, st.diff_max)
    return comp, fail, agree, diff, dropped


def _experiment_families(src: Store):
    """Gauges from this process's published view (with several workers it shows the
    deciding process's state, so they are never summed); counters from the (merged)
    counts."""
    state = GaugeMetricFamily("splitserve_experiment_state",
                              "1 for the experiment's current state", labels=["model", "state"])
    step = GaugeMetricFamily("splitserve_experiment_step", "Current step (1-based)",
                             labels=["model"])
    weight = GaugeMetricFamily("splitserve_experiment_candidate_weight",
                               "Candidate weight in percent", labels=["model"])
    ev = GaugeMetricFamily("splitserve_experiment_guardrail_evidence", "Sequential evidence "
                           "against the guardrail (alarm at 1/alpha)", labels=["model", "guardrail"])
    alarm = GaugeMetricFamily("splitserve_experiment_guardrail_alarm",
                              "1 while the guardrail alarms", labels=["model", "guardrail"])
    srm = GaugeMetricFamily("splitserve_experiment_srm_p_value", "Chi-square p-value of the "
                            "sample ratio check (assignment units)", labels=["model"])
    rollbacks = CounterMetricFamily("splitserve_experiment_rollbacks", "Rollbacks by reason "
                                    "(errors, latency: a guardrail; manual: a person)",
                                    labels=["model", "reason"])
    feedback = CounterMetricFamily("splitserve_experiment_feedback", "Feedback items by "
                                   "result (matched, unknown, duplicate)",
                                   labels=["model", "result"])
    reports = src.experiments().reports if src.experiments is not None else {}
    for model, r in sorted(reports.items()):
        for name in EXPERIMENT_STATES:
            state.add_metric([model, name], 1.0 if r.get("state") == name else 0.0)
        if r.get("step") is not None:
            step.add_metric([model], float(r["step"]))
        if r.get("candidate_weight") is not None:
            weight.add_metric([model], float(r["candidate_weight"]))
        for g, gv in sorted((r.get("guardrails") or {}).items()):
            ev.add_metric([model, g], float(gv["evidence"]))
            alarm.add_metric([model, g], 1.0 if gv["alarm"] else 0.0)
        p = (r.get("srm") or {}).get("p_value")
        if p is not None:
            srm.add_metric([model], float(p))
    for (kind, model, key), n in sorted(src.experiment_counts().items()):
        if kind == "rollbacks":
            rollbacks.add_metric([model, key], n)
        elif kind == "feedback":
            feedback.add_metric([model, key], n)
    return state, step, weight, ev, alarm, srm, rollbacks, feedback


def _cuda_families():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return ()
    alloc = GaugeMetricFamily("splitserve_cuda_memory_allocated_bytes",
                              "torch.cuda.memory_allocated per device", labels=["device"])
    res = GaugeMetricFamily("splitserve_cuda_memory_reserved_bytes",
                            "torch.cuda.memory_reserved per device", labels=["device"])
    for i in range(torch.cuda.device_count()):
        alloc.add_metric([f"cuda:{i}"], float(torch.cuda.memory_allocated(i)))
        res.add_metric([f"cuda:{i}"], float(torch.cuda.memory_reserved(i)))
    return alloc, res


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out = []
    cum = 0
    k = 0
    for b, idx in zip(EXPORT_BOUNDS, _EXPORT_IDX):
        while k <= idx:
            cum += counts[k]
            k += 1
        out.append((floatToGoString(b), float(cum)))
    out.append(("+Inf", float(sum(counts))))
    return out


def _batch_buckets(ex: dict[int, list]) -> list[tuple[str, float]]:
    out = [(floatToGoString(b), float(sum(c[0] for k, c in ex.items() if k <= b)))
           for b in BATCH_BOUNDS]
    out.append(("+Inf", float(sum(c[0] for c in ex.values()))))
    return out
