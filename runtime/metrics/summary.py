"""The A/B summary (`GET /v1/models/{m}/metrics`): per-version figures over a window.

A window is the difference between the cumulative counters now and a baseline of them
(merged across workers) taken at each routing change (the last ROUTING_MARKS kept per
model) and every CHECKPOINT_S (the last CHECKPOINTS kept: 15 minutes), for
`?since=routing|start|<epoch>`.
"""

from __future__ import annotations

import math
import sys
from collections import deque

from experiments.report import empty
from runtime import errors
from runtime.histogram import quantile
from runtime.metrics.merge import copy, export_state, merge_states, reading, subtract_states
from runtime.metrics.store import ROUTED, ShadowStats, Store, merge_counts

CHECKPOINT_S = 10.0
CHECKPOINTS = 90
ROUTING_MARKS = 16
SINCE_EXPECTED = "'routing', 'start' or a unix time in seconds"
CLIENT_CODES = ("INVALID_ARGUMENT", "TOO_LARGE", "NOT_FOUND", "CLIENT_TIMEOUT")
PRIMARY_EXCLUDED = ("shadow",)


def _ms(counts: list[int]) -> dict[str, float | None]:
    out = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        v = quantile(counts, q)
        out[name] = None if v is None else round(v * 1e3, 4)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _r4(x: float | None) -> float | None:
    """Shares and rates as people read them: 4 digits."""
    return None if x is None else round(x, 4)


def _units(x: float) -> float | int:
    """A weight in the config's units, as the config writes it (90, not 90.0)."""
    x = round(x, 4)
    return int(x) if x.is_integer() else x


def _parse_since(since: str) -> float:
    try:
        t = float(since)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t < 0:
        raise errors.invalid(f"since must be {SINCE_EXPECTED}, got {since!r}")
    return t


def _cuda_allocated(device: str | None) -> int | None:
    """torch.cuda.memory_allocated of the version's device (every tenant of that device),
    read now; None off CUDA."""
    if not device or not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated(device))


class Summary:
    """The baselines of `store`'s counters and the summary read against them."""

    def __init__(self, store: Store):
        self.store = store
        self.started = store.wall()
        self._marks: dict[str, deque] = {}  # model -> (wall, "routing_change", its counters)
        self._checkpoints: deque = deque(maxlen=CHECKPOINTS)  # (wall, "checkpoint", counters)

    def summary(self, model: str, since: str | None = None) -> dict:
        """Per-version A/B figures over a window: exact counts, latency percentiles,
        configured/effective weights (the config's units) against observed shares, memory,
        shadow agreement, and the experiment block. `since`: "routing" (the default: since
        the model's last routing change), "start" or unix seconds. Observed share counts
        weight-routed (split and sticky) requests only; `recent` is the last window_s
        seconds whatever the window."""
        src = reading(self.store)
        if not src.model_known(model):
            raise errors.not_found(f"unknown model '{model}'")
        window, base = self._window(model, since)
        if base is not None:
            src = copy(src, subtract_states(export_state(src, model), base))
        return _summary(src, model, window, self._experiment_report(model))

    # ---- windows: baselines of the cumulative counters ---------------------------------
    def _counters(self, model: str | None = None) -> dict:
        """The cumulative counters now, merged with the peers' (every worker's totals),
        without what a window never subtracts (queue/compute histograms, the ring)."""
        store = self.store
        state = export_state(store, model)
        if store.peers is not None:
            state = merge_states([state, *store.peers()])
            if model is not None:  # a peer's file holds every model
                for f in ("cells", "series", "exec", "shadow", "shadow_dropped", "retired"):
                    state[f] = [x for x in state[f] if x[0] == model]
        state["experiment_counts"] = []  # a window never subtracts them
        for *_k, d in state["series"]:
            for f in ("q", "c", "window"):
                d.pop(f, None)
        return state

    def routing_changed(self, model: str) -> None:
        """The router applied a new config for `model` (Router.subscribe): the baseline of
        `since=routing`. Also at start, when the config is first read."""
        marks = self._marks.get(model)
        if marks is None:
            marks = self._marks[model] = deque(maxlen=ROUTING_MARKS)
        marks.append((self.store.wall(), "routing_change", self._counters(model)))

    def checkpoint(self) -> None:
        """A baseline for `since=<epoch>`; Core calls it every CHECKPOINT_S."""
        self._checkpoints.append((self.store.wall(), "checkpoint", self._counters()))

    def _window(self, model: str, since: str | None) -> tuple[dict, dict | None]:
        """(the answer's `window`, the baseline counters or None for since start). An epoch
        resolves to the first baseline at or after it (never earlier traffic), else the
        latest one; `from` says which."""
        now = self.store.wall()
        start = (self.started, "process_start", None)
        marks = self._marks.get(model, ())
        since = since or "routing"
        if since == "routing":
            at, event, base = marks[-1] if marks else start
        elif since == "start":
            at, event, base = start
        else:
            t = _parse_since(since)
            if t > now + 1.0:
                raise errors.invalid(f"since={since} is in the future (now {now:.0f}); "
                                     f"expected {SINCE_EXPECTED}")
            cands = [start, *marks, *self._checkpoints]
            after = [c for c in cands if c[0] >= t]
            at, event, base = (min(after, key=lambda c: c[0]) if after
                               else max(cands, key=lambda c: c[0]))
        return {"since": since, "from": round(at, 3), "from_event": event,
                "seconds": round(max(0.0, now - at), 3)}, base

    def _experiment_report(self, model: str) -> dict:
        got = None if self.store.experiments is None else self.store.experiments().reports.get(model)
        return empty() if got is None else dict(got)  # every key in every state, as GET .../experiment


def _summary(src: Store, model: str, window: dict, experiment: dict) -> dict:
    statuses = src.statuses(model)
    configured, effective, labels = src.weights(model)
    units = sum(configured.values()) if configured else 100.0  # effective weight, config units
    now_sec = int(src.clock())
    shadow_by_v: dict[int, list[tuple[int, ShadowStats]]] = {}
    for (m, p, sv), st in src.shadow.items():
        if m == model:
            shadow_by_v.setdefault(sv, []).append((p, st))
    versions = {v for v, s in statuses.items() if s.state.value != "END"}
    versions.update(v for (m, v) in src.by_version if m == model)
    versions.update(shadow_by_v)

    rows = {}
    routed_all = routed_recent = 0
    for v in sorted(versions):
        series = src.by_version.get((model, v), [])
        prim = [s for s in series if s.route not in PRIMARY_EXCLUDED]
        n_ok = sum(s.n for s in prim)
        n_err = sum(s.err for s in prim)
        routed = sum(s.n + s.err for s in prim if s.route in ROUTED)
        by_route: dict[str, int] = {}
        for s in prim:
            if s.n + s.err:
                by_route[s.route] = by_route.get(s.route, 0) + s.n + s.err
        rn = re = rrouted = 0
        rlats = []
        for s in prim:
            wn, we, wl = s.window(now_sec, src.window_s)
            rn += wn
            re += we
            rlats.extend(wl)
            if s.route in ROUTED:
                rrouted += wn
        routed_all += routed
        routed_recent += rrouted
        ex = src.executions(model, v)
        ex_n = sum(b[0] for b in ex.values())
        st = statuses.get(v)
        life = src.life.get((model, v))
        rows[v] = (routed, rrouted, st is not None and st.state.value == "END", {
            "version": str(v),
            "state": st.state.value if st is not None else None,
            "reason": st.error if st is not None else None,
            "labels": labels.get(v, []),
            "label": labels.get(v, []),  # the old name of `labels`, kept for one release
            "weight": None if configured is None else _units(configured.get(v, 0.0)),
            "configured_share": None if configured is None else _r4(configured.get(v, 0.0) / units),
            "effective_weight": _units(effective.get(v, 0.0) * units),
            "expected_share": _r4(effective.get(v, 0.0)),
            "observed_share": None,
            "requests": n_ok + n_err,
            "routed_requests": routed,
            "by_route": dict(sorted(by_route.items())),
            "errors": n_err,
            "error_rate": _r4(_ratio(n_err, n_ok + n_err)),
            "latency_ms": _ms(merge_counts(s.lat for s in prim)),
            "recent": {"requests": rn, "errors": re, "error_rate": _r4(_ratio(re, rn)),
                       "latency_ms": _ms(merge_counts(rlats)), "observed_share": None},
            "mean_batch_size": _r4(_ratio(sum(k * b[0] for k, b in ex.items()), ex_n)),
            "memory_bytes": src.memory(model, v),
            "device": life.device if life is not None else None,
            "execution": st.execution if st is not None else None,
            "device_memory_allocated_bytes": _cuda_allocated(life.device if life else None),
            "load_failures": life.failures if life is not None else 0,
            "shadow": _shadow_summary(shadow_by_v.get(v)),
            "shadow_dropped": src.shadow_dropped.get((model, v), 0),
        })
    out: list[dict] = []
    ended: list[dict] = []
    for v, (routed, rrouted, is_ended, row) in rows.items():
        row["observed_share"] = _r4(_ratio(routed, routed_all))
        row["recent"]["observed_share"] = _r4(_ratio(rrouted, routed_recent))
        (ended if is_ended else out).append(row)
    unrouted = [s for s in src.series.values() if s.model == model and s.version is None]
    mv = src.views().model(model)
    return {"model": model, "window": window, "window_s": src.window_s, "versions": out,
            "ended": ended,
            # Refused before any version ran them (bad input, unknown version or
            # label, nothing AVAILABLE): never part of a version's error rate.
            "client_errors": sum(c.n for k, c in src.cells.items()
                                 if k[0] == model and k[1] is None
                                 and k[4] in CLIENT_CODES),
            "unrouted_errors": sum(s.err for s in unrouted),
            # a bad model.yaml: what serves uses the last good one, or nothing serves
            "model_config_error": mv.config_error() if mv is not None else None,
            "experiment": experiment}


def _shadow_summary(items: list[tuple[int, ShadowStats]] | None) -> dict | None:
    if not items:
        return None
    n = sum(st.n for _, st in items)
    agree_n = sum(st.agree_n for _, st in items)
    diff_n = sum(st.diff_n for _, st in items)
    maxes = [st.diff_max for _, st in items if st.diff_max is not None]
    return {"comparisons": n,
            "failures": sum(st.fails for _, st in items),
            "primary_versions": sorted(str(p) for p, _ in items),
            "argmax_agreement": _ratio(sum(st.agree_yes for _, st in items), agree_n),
            "max_abs_diff": max(maxes) if maxes else None,
            "mean_max_abs_diff": _ratio(sum(st.diff_sum for _, st in items), diff_n)}
