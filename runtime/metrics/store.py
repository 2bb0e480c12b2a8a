"""Per-version metrics: exact counts and latency histograms by the version that served.

Owns every figure the servers report: Prometheus text (`registry`, built at scrape time
by a custom collector), Triton's statistics extension (`statistics`) and the A/B summary
(`summary`). Runs on the event loop: `record_*` and `lifecycle_event` are called there
and so are the readers, so nothing is locked.

The hot path (`record_request`) is O(1): one dict lookup on the full label tuple, a few
integer additions and three `bisect`s into fixed log-spaced bucket edges (48 per decade,
about 4.9 % wide, plus the exported Prometheus bounds as exact edges). Percentiles are
computed on read by interpolating inside a bucket, so they are accurate to a few percent.
The recent window is a ring of per-second bucket arrays, rotated lazily on write by
integer second arithmetic on the injectable `clock`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from runtime import errors
from runtime.histogram import EDGES, EXPORT_BOUNDS, NB, PER_DECADE, quantile  # noqa: F401  (re-exported)
from runtime.metrics.merge import merge_states, subtract_states
from runtime.views import ExperimentsView, LifecycleEvent, Snapshot, VersionView

log = logging.getLogger("splitserve.metrics")

WINDOW_S = 60
# Exported Prometheus bounds (seconds); each is an exact fine edge.
# Fixed batch-size bounds: a bucket set that never changes keeps rate() and
# histogram_quantile() valid across scrapes.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RETIRE_AFTER_S = 300.0  # an ENDed version's series leave the scrape this long after
STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END", "FAILED")
UNKNOWN_MODEL = "_unknown"  # label for requests naming no model we know (not a valid name)
CLIENT_CODES = ("INVALID_ARGUMENT", "TOO_LARGE", "NOT_FOUND", "CLIENT_TIMEOUT")
ROUTED = ("split", "sticky")  # routes that follow the weights: what observed share counts
PRIMARY_EXCLUDED = ("shadow",)
STATE_FORMAT = 1  # of export_state(); a reader refuses any other
# A/B summary windows: baselines of the cumulative counters (merged across workers),
# taken at each routing change (the last ROUTING_MARKS kept per model) and every
# CHECKPOINT_S (the last CHECKPOINTS kept: 15 minutes) for `?since=<epoch>`.
CHECKPOINT_S = 10.0
CHECKPOINTS = 90
ROUTING_MARKS = 16
SINCE_EXPECTED = "'routing', 'start' or a unix time in seconds"
EXPERIMENT_STATES = ("running", "holding", "paused", "rolled_back", "promoted", "none")
NO_EXPERIMENT = {"state": "none", "decisions": []}


_EXPORT_IDX = [EDGES.index(b) for b in EXPORT_BOUNDS]


def _merge(arrays: Iterable[list[int]]) -> list[int]:
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return [0] * NB
    if len(arrays) == 1:
        return list(arrays[0])
    return [sum(col) for col in zip(*arrays)]


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


class Series:
    """Every figure of one (model, version, route); version None: never reached one."""

    __slots__ = ("model", "version", "route", "n", "err", "ok_sum", "err_sum", "lat", "q",
                 "q_sum", "c", "c_sum", "inf", "batches", "last", "w_sec", "w_n", "w_err",
                 "w_lat")

    def __init__(self, model: str, version: int | None, route: str):
        self.model, self.version, self.route = model, version, route
        self.n = self.err = self.inf = 0  # n: successful requests; err: failed ones
        self.ok_sum = self.err_sum = self.q_sum = self.c_sum = 0.0
        self.lat = [0] * NB  # end-to-end latency of successful requests
        self.q = [0] * NB
        self.c = [0] * NB
        self.batches: dict[int, list] = {}  # request batch size -> [count, compute seconds]
        self.last: float | None = None  # clock() of the last request
        self.w_sec = [-1] * WINDOW_S  # ring: which second each slot holds
        self.w_n = [0] * WINDOW_S
        self.w_err = [0] * WINDOW_S
        self.w_lat: list[list[int] | None] = [None] * WINDOW_S

    def window(self, now_sec: int, window_s: int) -> tuple[int, int, list[list[int]]]:
        n = e = 0
        lats = []
        for j in range(WINDOW_S):
            if 0 <= now_sec - self.w_sec[j] < window_s:
                n += self.w_n[j]
                e += self.w_err[j]
                if self.w_lat[j] is not None:
                    lats.append(self.w_lat[j])
        return n, e, lats


class _Cell:
    """One exact counter (model, version, route, protocol, code) and its series."""

    __slots__ = ("n", "ok", "series")

    def __init__(self, series: Series, ok: bool):
        self.n = 0
        self.ok = ok
        self.series = series


class ShadowStats:
    __slots__ = ("n", "fails", "diff_n", "diff_sum", "diff_max", "agree_n", "agree_yes")

    def __init__(self):
        self.n = self.fails = self.diff_n = self.agree_n = self.agree_yes = 0
        self.diff_sum = 0.0
        self.diff_max: float | None = None


class Lifecycle:
    """Last load of one version, and its failures (reason kept for the summary)."""

    __slots__ = ("load_s", "warmup_s", "device", "memory_bytes", "failures", "last_error")

    def __init__(self):
        self.load_s = self.warmup_s = None
        self.device = None
        self.memory_bytes = 0
        self.failures = 0
        self.last_error: str | None = None


class Metrics:
    """Records requests, shadow comparisons, executed batches and lifecycle events.

    `views` returns the manager's published `Snapshot` (states, in-flight counts, memory
    at read time); `clock` (seconds, monotonic) drives the recent window and retirement;
    `wall` (epoch seconds) only turns the last request time into Triton's
    `last_inference`. A version's series are retired `retire_after_s` after it ENDed (so
    scrapes do not grow forever); their counts fold into the model totals
    (`splitserve_model_requests`), which never go down.
    """

    def __init__(self, router=None, views: Callable[[], Snapshot] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, window_s: int = WINDOW_S,
                 retire_after_s: float = RETIRE_AFTER_S):
        if not 0 < window_s <= WINDOW_S:
            raise ValueError(f"window_s must be in 1..{WINDOW_S}")
        self.router = router
        self.views = views or (lambda: Snapshot())
        self.retire_after_s = retire_after_s
        self.clock = clock
        self.wall = wall
        self.window_s = window_s
        self._cells: dict[tuple, _Cell] = {}
        self._series: dict[tuple, Series] = {}
        self._by_version: dict[tuple[str, int], list[Series]] = {}
        self._exec: dict[tuple[str, int], dict[int, list]] = {}  # from record_batch
        self._shadow: dict[tuple[str, int, int], ShadowStats] = {}
        self._life: dict[tuple[str, int], Lifecycle] = {}
        self._shadow_dropped: dict[tuple[str, int], int] = {}
        self._ended: dict[tuple[str, int], float] = {}  # clock() of END, until retired
        self._retired: dict[tuple[str, str, str], int] = {}  # (model, protocol, code) -> n
        # Worker processes: peers() returns the other workers' raw-counter snapshots
        # (runtime/metrics/merge.py); every read then answers the merged totals.
        self.peers: Callable[[], list[dict]] | None = None
        # The ExperimentRunner's published view (set by Core): reports become gauges of
        # this process, counts are summed across processes like every counter here.
        self.experiments: Callable[[], ExperimentsView] | None = None
        self._exp_counts: dict[tuple[str, str, str], int] | None = None  # imported (merged) counts
        self.started = wall()
        self._marks: dict[str, deque] = {}  # model -> (wall, "routing_change", its counters)
        self._checkpoints: deque = deque(maxlen=CHECKPOINTS)  # (wall, "checkpoint", counters)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # ---- hot path (event loop) -----------------------------------------------------
    def record_request(self, model: str, version: int | None, route: str, protocol: str,
                       code: str, latency_s: float, queue_s: float, compute_s: float,
                       batch: int) -> None:
        """One finished request (code "OK" or an errors.Code value), by the version that
        served it (None when it never reached one). Durations in seconds."""
        if version is None and not self._model_known(model):
            model = UNKNOWN_MODEL  # client-chosen names must not grow the label set
        cell = self._cells.get((model, version, route, protocol, code))
        if cell is None:
            cell = self._new_cell(model, version, route, protocol, code)
        cell.n += 1
        s = cell.series
        now = self.clock()
        s.last = now
        sec = int(now)
        j = sec % WINDOW_S
        if s.w_sec[j] != sec:
            s.w_sec[j] = sec
            s.w_n[j] = s.w_err[j] = 0
            s.w_lat[j] = None
        s.w_n[j] += 1
        if cell.ok:
            s.n += 1
            s.ok_sum += latency_s
            i = bisect_left(EDGES, latency_s)
            s.lat[i] += 1
            w = s.w_lat[j]
            if w is None:
                w = s.w_lat[j] = [0] * NB
            w[i] += 1
            s.q[bisect_left(EDGES, queue_s)] += 1
            s.q_sum += queue_s
            s.c[bisect_left(EDGES, compute_s)] += 1
            s.c_sum += compute_s
            s.inf += batch
            b = s.batches.get(batch)
            if b is None:
                b = s.batches[batch] = [0, 0.0]
            b[0] += 1
            b[1] += compute_s
        else:
            s.err += 1
            s.err_sum += latency_s
            s.w_err[j] += 1

    def _new_cell(self, model, version, route, protocol, code) -> _Cell:
        skey = (model, version, route)
        s = self._series.get(skey)
        if s is None:
            s = self._series[skey] = Series(model, version, route)
            if version is not None:
                self._by_version.setdefault((model, version), []).append(s)
        cell = self._cells[(model, version, route, protocol, code)] = _Cell(s, code == "OK")
        return cell

    def record_batch(self, model: str, version: int, size: int, compute_s: float) -> None:
        """One executed batch (for a dynamic batcher). Once a version reports batches,
        its execution count and batch statistics come from here, not from requests."""
        d = self._exec.get((model, version))
        if d is None:
            d = self._exec[(model, version)] = {}
        b = d.get(size)
        if b is None:
            b = d[size] = [0, 0.0]
        b[0] += 1
        b[1] += compute_s

    def record_shadow(self, model: str, primary: int, shadow: int, ok: bool,
                      max_abs_diff: float | None, argmax_agree: bool | None) -> None:
        st = self._shadow.get((model, primary, shadow))
        if st is None:
            st = self._shadow[(model, primary, shadow)] = ShadowStats()
        if not ok:
            st.fails += 1
            return
        st.n += 1
        if max_abs_diff is not None:
            st.diff_n += 1
            st.diff_sum += max_abs_diff
            if st.diff_max is None or max_abs_diff > st.diff_max:
                st.diff_max = max_abs_diff
        if argmax_agree is not None:
            st.agree_n += 1
            st.agree_yes += bool(argmax_agree)

    def record_shadow_dropped(self, model: str, version: int) -> None:
        """A shadow copy for `version` was dropped (lane full, or the version unloading)."""
        key = (model, version)
        self._shadow_dropped[key] = self._shadow_dropped.get(key, 0) + 1

    def lifecycle_event(self, ev: LifecycleEvent) -> None:
        """From the manager: "loaded", "failed" or "unloaded" for one version."""
        key = (ev.model, ev.version)
        life = self._life.get(key)
        if life is None:
            life = self._life[key] = Lifecycle()
        if ev.kind == "loaded":
            life.load_s, life.warmup_s = ev.load_s, ev.warmup_s
            life.device, life.memory_bytes = ev.device, ev.memory_bytes
            self._ended.pop(key, None)
        elif ev.kind == "failed":
            life.failures += 1
            life.last_error = ev.error
        elif ev.kind == "unloaded":
            self._ended[key] = self.clock()

    # ---- retirement of ended versions ----------------------------------------------
    def retire(self) -> None:
        """Drop the series of versions ENDed more than retire_after_s ago (called on
        read); their request counts move into the model totals."""
        if not self._ended:
            return
        now = self.clock()
        snap = self.views()
        for key, at in list(self._ended.items()):
            if now - at < self.retire_after_s:
                continue
            model, version = key
            mv = snap.model(model)
            vv = mv.version(version) if mv is not None else None
            if vv is not None and vv.state.value != "END":
                continue  # it came back
            del self._ended[key]
            for ck in [k for k in self._cells if k[0] == model and k[1] == version]:
                cell = self._cells.pop(ck)
                rk = (model, ck[3], ck[4])
                self._retired[rk] = self._retired.get(rk, 0) + cell.n
            for sk in [k for k in self._series if k[0] == model and k[1] == version]:
                del self._series[sk]
            self._by_version.pop(key, None)
            self._exec.pop(key, None)
            self._life.pop(key, None)
            self._shadow_dropped.pop(key, None)
            for shk in [k for k in self._shadow if k[0] == model and version in k[1:]]:
                del self._shadow[shk]
            log.info("event=metrics_retired model=%s version=%d", model, version)

    # ---- reads: shared helpers -----------------------------------------------------
    def _model_known(self, model: str) -> bool:
        if self.views().model(model) is not None:
            return True
        return any(m == model for (m, _v) in self._by_version)

    def _model_names(self) -> list[str]:
        names = {m for (m, _v) in self._by_version}
        names.update(self.views().names())
        return sorted(names)

    def _statuses(self, model: str) -> dict[int, VersionView]:
        mv = self.views().model(model)
        return {} if mv is None else {v.version: v for v in mv.versions}

    def _memory(self, model: str, version: int) -> int:
        v = self._statuses(model).get(version)
        return v.memory_bytes if v is not None else 0

    def _executions(self, model: str, version: int) -> dict[int, list]:
        """Executed batch size -> [count, compute seconds]."""
        d = self._exec.get((model, version))
        if d is not None:
            return d
        out: dict[int, list] = {}
        for s in self._by_version.get((model, version), ()):
            for size, (n, c) in s.batches.items():
                b = out.setdefault(size, [0, 0.0])
                b[0] += n
                b[1] += c
        return out

    def _last_epoch_ms(self, series: Iterable[Series]) -> int:
        last = max((s.last for s in series if s.last is not None), default=None)
        if last is None:
            return 0
        return int((self.wall() - (self.clock() - last)) * 1000)

    def _weights(self, model: str) -> tuple[dict[int, float] | None, dict[int, float], dict[int, list[str]]]:
        """(configured weight per version in the config's units, or None without weights;
        effective share (fractions); labels per version)."""
        if self.router is None:
            return None, {}, {}
        cfg = self.router.get_config(model)
        configured = None
        if cfg.weights:
            configured = {}
            for ref, w in cfg.weights.items():
                v = cfg.target_of(ref)
                configured[v] = configured.get(v, 0.0) + float(w)
        table = self.router.table(model)
        labels: dict[int, list[str]] = {}
        for name, v in sorted(table.labels.items()):
            labels.setdefault(v, []).append(name)
        return configured, dict(table.weights), labels

    # ---- Triton statistics extension -----------------------------------------------
    def statistics(self, model: str | None = None, version: int | str | None = None) -> dict:
        """`{"model_stats": [...]}` in the shape of Triton's statistics extension.

        model None or "": every model. version None or "": every version of the model.
        Unknown model or version: NOT_FOUND. Shadow requests count too (they ran on the
        version); compute_input/compute_output are folded into compute_infer (ns 0).
        """
        if self.peers is not None:
            return self.merged().statistics(model, version)
        self.retire()
        if isinstance(version, str):
            if version == "":
                version = None
            elif not (version.isascii() and version.isdigit()):
                raise errors.invalid(f"version must be a positive integer, got {version!r}")
            else:
                version = int(version)
        if not model:
            if version is not None:
                raise errors.invalid("a version needs a model name")
            return {"model_stats": [self._model_stat(m, v) for m in self._model_names()
                                    for v in self._versions_of(m)]}
        if not self._model_known(model):
            raise errors.not_found(f"unknown model '{model}'")
        versions = self._versions_of(model)
        if version is not None:
            if version not in versions:
                raise errors.not_found(f"model '{model}' has no statistics for version {version} "
                                       f"(known: {', '.join(map(str, versions)) or 'none'})")
            versions = [version]
        return {"model_stats": [self._model_stat(model, v) for v in versions]}

    def _versions_of(self, model: str) -> list[int]:
        vs = set(self._statuses(model))
        vs.update(v for (m, v) in self._by_version if m == model)
        return sorted(vs)

    def _model_stat(self, model: str, version: int) -> dict:
        series = self._by_version.get((model, version), [])
        n = sum(s.n for s in series)
        ex = self._executions(model, version)
        batch_stats = []
        n_exec = c_ns = 0
        for size in sorted(ex):
            cnt, comp = ex[size]
            n_exec += cnt
            c_ns += int(comp * 1e9)
            batch_stats.append({"batch_size": size,
                                "compute_input": {"count": cnt, "ns": 0},
                                "compute_infer": {"count": cnt, "ns": int(comp * 1e9)},
                                "compute_output": {"count": cnt, "ns": 0}})

        def dur(count, secs):
            return {"count": int(count), "ns": int(secs * 1e9)}

        memory = []
        vv = self._statuses(model).get(version)
        if vv is not None and vv.device is not None and vv.memory_bytes:
            dev, _, idx = vv.device.partition(":")
            memory.append({"type": "GPU" if dev == "cuda" else "CPU",
                           "id": int(idx) if idx.isdigit() else 0,
                           "byte_size": int(vv.memory_bytes)})
        return {
            "name": model,
            "version": str(version),
            "last_inference": self._last_epoch_ms(series),
            "inference_count": sum(s.inf for s in series),
            "execution_count": n_exec,
            "inference_stats": {
                "success": dur(n, sum(s.ok_sum for s in series)),
                "fail": dur(sum(s.err for s in series), sum(s.err_sum for s in series)),
                "queue": dur(n, sum(s.q_sum for s in series)),
                "compute_input": dur(n_exec, 0.0),
                "compute_infer": {"count": n_exec, "ns": c_ns},
                "compute_output": dur(n_exec, 0.0),
                "cache_hit": dur(0, 0.0),
                "cache_miss": dur(0, 0.0),
            },
            "batch_stats": batch_stats,
            "memory_usage": memory,
        }

    # ---- A/B summary ---------------------------------------------------------------
    def summary(self, model: str, since: str | None = None) -> dict:
        """Per-version A/B figures over a window: exact counts, latency percentiles,
        configured/effective weights (the config's units) against observed shares, memory,
        shadow agreement, and the experiment block. `since`: "routing" (the default: since
        the model's last routing change), "start" or unix seconds. Observed share counts
        weight-routed (split and sticky) requests only; `recent` is the last window_s
        seconds whatever the window."""
        src = self.merged() if self.peers is not None else self
        if src is self:
            self.retire()
        if not src._model_known(model):
            raise errors.not_found(f"unknown model '{model}'")
        window, base = self._window(model, since)
        if base is not None:
            src = src._copy(subtract_states(src.export_state(model), base))
        return src._summary(model, window, self._experiment_report(model))

    # ---- windows: baselines of the cumulative counters ---------------------------------
    def _counters(self, model: str | None = None) -> dict:
        """The cumulative counters now, merged with the peers' (every worker's totals),
        without what a window never subtracts (queue/compute histograms, the ring)."""
        state = self.export_state(model)
        if self.peers is not None:
            state = merge_states([state, *self.peers()])
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
        marks.append((self.wall(), "routing_change", self._counters(model)))

    def checkpoint(self) -> None:
        """A baseline for `since=<epoch>`; Core calls it every CHECKPOINT_S."""
        self._checkpoints.append((self.wall(), "checkpoint", self._counters()))

    def _window(self, model: str, since: str | None) -> tuple[dict, dict | None]:
        """(the answer's `window`, the baseline counters or None for since start). An epoch
        resolves to the first baseline at or after it (never earlier traffic), else the
        latest one; `from` says which."""
        now = self.wall()
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
        if self.experiments is None:
            return dict(NO_EXPERIMENT)
        return dict(self.experiments().reports.get(model, NO_EXPERIMENT))

    def _summary(self, model: str, window: dict, experiment: dict) -> dict:
        statuses = self._statuses(model)
        configured, effective, labels = self._weights(model)
        units = sum(configured.values()) if configured else 100.0  # effective weight, config units
        now_sec = int(self.clock())
        shadow_by_v: dict[int, list[tuple[int, ShadowStats]]] = {}
        for (m, p, sv), st in self._shadow.items():
            if m == model:
                shadow_by_v.setdefault(sv, []).append((p, st))
        versions = {v for v, s in statuses.items() if s.state.value != "END"}
        versions.update(v for (m, v) in self._by_version if m == model)
        versions.update(shadow_by_v)

        rows = {}
        routed_all = routed_recent = 0
        for v in sorted(versions):
            series = self._by_version.get((model, v), [])
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
                wn, we, wl = s.window(now_sec, self.window_s)
                rn += wn
                re += we
                rlats.extend(wl)
                if s.route in ROUTED:
                    rrouted += wn
            routed_all += routed
            routed_recent += rrouted
            ex = self._executions(model, v)
            ex_n = sum(b[0] for b in ex.values())
            st = statuses.get(v)
            life = self._life.get((model, v))
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
                "latency_ms": _ms(_merge(s.lat for s in prim)),
                "recent": {"requests": rn, "errors": re, "error_rate": _r4(_ratio(re, rn)),
                           "latency_ms": _ms(_merge(rlats)), "observed_share": None},
                "mean_batch_size": _r4(_ratio(sum(k * b[0] for k, b in ex.items()), ex_n)),
                "memory_bytes": self._memory(model, v),
                "device": life.device if life is not None else None,
                "execution": st.execution if st is not None else None,
                "device_memory_allocated_bytes": _cuda_allocated(life.device if life else None),
                "load_failures": life.failures if life is not None else 0,
                "shadow": self._shadow_summary(shadow_by_v.get(v)),
                "shadow_dropped": self._shadow_dropped.get((model, v), 0),
            })
        out: list[dict] = []
        ended: list[dict] = []
        for v, (routed, rrouted, is_ended, row) in rows.items():
            row["observed_share"] = _r4(_ratio(routed, routed_all))
            row["recent"]["observed_share"] = _r4(_ratio(rrouted, routed_recent))
            (ended if is_ended else out).append(row)
        unrouted = [s for s in self._series.values() if s.model == model and s.version is None]
        mv = self.views().model(model)
        return {"model": model, "window": window, "window_s": self.window_s, "versions": out,
                "ended": ended,
                # Refused before any version ran them (bad input, unknown version or
                # label, nothing AVAILABLE): never part of a version's error rate.
                "client_errors": sum(c.n for k, c in self._cells.items()
                                     if k[0] == model and k[1] is None
                                     and k[4] in CLIENT_CODES),
                "unrouted_errors": sum(s.err for s in unrouted),
                # a bad model.yaml: what serves uses the last good one, or nothing serves
                "model_config_error": mv.config_error() if mv is not None else None,
                "experiment": experiment}

    @staticmethod
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

    # ---- Prometheus families (built at scrape time) --------------------------------
    def families(self):
        if self.peers is not None:
            yield from self.merged().families()
            return
        self.retire()
        yield self._requests_family()
        yield self._model_totals_family()
        yield from self._histogram_families()
        yield from self._version_families()
        yield self._model_config_family()
        yield from self._routing_families()
        yield from self._shadow_families()
        yield from self._experiment_families()
        yield from self._cuda_families()

    def _requests_family(self):
        f = CounterMetricFamily("splitserve_requests", "Finished requests by the version that "
                                "served them (version empty: never reached one)",
                                labels=["model", "version", "route", "protocol", "code"])
        for (m, v, r, p, c), cell in list(self._cells.items()):
            f.add_metric([m, "" if v is None else str(v), r, p, c], cell.n)
        return f

    def _model_totals_family(self):
        f = CounterMetricFamily("splitserve_model_requests", "Finished requests per model, "
                                "ended versions included (never goes down)",
                                labels=["model", "protocol", "code"])
        totals = dict(self._retired)
        for (m, _v, _r, p, c), cell in list(self._cells.items()):
            totals[(m, p, c)] = totals.get((m, p, c), 0) + cell.n
        for (m, p, c), n in sorted(totals.items()):
            f.add_metric([m, p, c], n)
        return f

    def _histogram_families(self):
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
        for s in list(self._series.values()):
            if s.version is not None and s.n:
                lat.add_metric([s.model, str(s.version), s.route], _buckets(s.lat), s.ok_sum)
        for (m, v), series in sorted(self._by_version.items()):
            if not any(s.n for s in series):
                continue
            lv = [m, str(v)]
            qf.add_metric(lv, _buckets(_merge(s.q for s in series)), sum(s.q_sum for s in series))
            cf.add_metric(lv, _buckets(_merge(s.c for s in series)), sum(s.c_sum for s in series))
            ex = self._executions(m, v)
            bf.add_metric(lv, _batch_buckets(ex), float(sum(k * b[0] for k, b in ex.items())))
        return lat, qf, cf, bf

    def _version_families(self):
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
        snap = self.views()
        for model in self._model_names():
            for v, st in sorted(self._statuses(model).items()):
                lv = [model, str(v)]
                for name in STATES:
                    state.add_metric(lv + [name], 1.0 if st.state.value == name else 0.0)
                inflight.add_metric(lv, float(snap.inflight(model, v)))
                mem.add_metric(lv, float(st.memory_bytes))
        for (m, v), life in sorted(self._life.items()):
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

    def _model_config_family(self):
        """1 while a model's model.yaml is invalid (the error itself is on the API, not a
        label: GET /v2/models/{m} parameters.model_config_error), 0 once it reads again."""
        f = GaugeMetricFamily("splitserve_model_config_error",
                              "1 while the model's model.yaml is invalid", labels=["model"])
        snap = self.views()
        for model in snap.names():
            f.add_metric([model], 0.0 if snap.model(model).spec_error is None else 1.0)
        return f

    def _routing_families(self):
        labels = ["model", "version"]
        eff = GaugeMetricFamily("splitserve_routing_weight",
                                "Effective share of weight-routed traffic the router assigns",
                                labels=labels)
        conf = GaugeMetricFamily("splitserve_routing_configured_weight",
                                 "Configured (normalised) weight", labels=labels)
        obs = GaugeMetricFamily("splitserve_traffic_share", "Observed share of weight-routed "
                                f"(split, sticky) requests over the last {self.window_s} s",
                                labels=labels)
        models = set(self._model_names())
        if self.router is not None:
            models.update(self.router.models())
        now_sec = int(self.clock())
        for model in sorted(models):
            configured, effective, _ = self._weights(model)
            for v, w in sorted(effective.items()):
                eff.add_metric([model, str(v)], w)
            total = sum((configured or {}).values())
            for v, w in sorted((configured or {}).items()):
                conf.add_metric([model, str(v)], w / total)
            counts = {}
            for s in self._series.values():
                if s.model == model and s.version is not None and s.route in ROUTED:
                    counts[s.version] = counts.get(s.version, 0) + s.window(now_sec, self.window_s)[0]
            total = sum(counts.values())
            if total:
                for v, n in sorted(counts.items()):
                    obs.add_metric([model, str(v)], n / total)
        return eff, conf, obs

    def _shadow_families(self):
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
        for (m, v), n in sorted(self._shadow_dropped.items()):
            dropped.add_metric([m, str(v)], n)
        for (m, p, v), st in sorted(self._shadow.items()):
            lv = [m, str(p), str(v)]
            comp.add_metric(lv, st.n)
            fail.add_metric(lv, st.fails)
            if st.agree_n:
                agree.add_metric(lv, st.agree_yes / st.agree_n)
            if st.diff_max is not None:
                diff.add_metric(lv, st.diff_max)
        return comp, fail, agree, diff, dropped

    def _experiment_families(self):
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
        reports = self.experiments().reports if self.experiments is not None else {}
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
        for (kind, model, key), n in sorted(self._experiment_counts().items()):
            if kind == "rollbacks":
                rollbacks.add_metric([model, key], n)
            elif kind == "feedback":
                feedback.add_metric([model, key], n)
        return state, step, weight, ev, alarm, srm, rollbacks, feedback

    def _cuda_families(self):
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


    # ---- raw counters as JSON-able values (worker processes, replicas) ------------
    def export_state(self, model: str | None = None) -> dict:
        """Every counter this process recorded (of `model` only, when given), as plain
        lists and numbers (no pickle): what a worker writes to its snapshot file.
        Histograms are sparse [index, count] pairs. Lifecycle figures stay per process
        (every worker loads every version)."""
        self.retire()

        def mine(m: str) -> bool:
            return model is None or m == model

        series = []
        for (m, v, r), s in self._series.items():
            if not mine(m):
                continue
            window = [[s.w_sec[j], s.w_n[j], s.w_err[j], _sparse(s.w_lat[j])]
                      for j in range(WINDOW_S) if s.w_sec[j] >= 0]
            series.append([m, v, r, {
                "n": s.n, "err": s.err, "inf": s.inf, "ok_sum": s.ok_sum,
                "err_sum": s.err_sum, "q_sum": s.q_sum, "c_sum": s.c_sum,
                "lat": _sparse(s.lat), "q": _sparse(s.q), "c": _sparse(s.c),
                "batches": [[k, b[0], b[1]] for k, b in s.batches.items()],
                "last": s.last, "window": window}])
        return {
            "format": STATE_FORMAT,
            "cells": [[m, v, r, p, c, cell.n] for (m, v, r, p, c), cell in self._cells.items()
                      if mine(m)],
            "series": series,
            "exec": [[m, v, [[k, b[0], b[1]] for k, b in d.items()]]
                     for (m, v), d in self._exec.items() if mine(m)],
            "shadow": [[m, p, v, st.n, st.fails, st.diff_n, st.diff_sum, st.diff_max,
                        st.agree_n, st.agree_yes] for (m, p, v), st in self._shadow.items()
                       if mine(m)],
            "shadow_dropped": [[m, v, n] for (m, v), n in self._shadow_dropped.items() if mine(m)],
            "retired": [[m, p, c, n] for (m, p, c), n in self._retired.items() if mine(m)],
            "experiment_counts": [[k, m, key, n] for (k, m, key), n in
                                  sorted(self._experiment_counts().items()) if mine(m)],
        }

    def import_state(self, state: dict) -> None:
        """Replace this object's counters with `state` (the shape export_state writes)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"metrics state format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT}")
        self._cells, self._series, self._by_version = {}, {}, {}
        for m, v, r, d in state["series"]:
            s = Series(m, v, r)
            s.n, s.err, s.inf = d["n"], d["err"], d["inf"]
            s.ok_sum, s.err_sum, s.q_sum, s.c_sum = d["ok_sum"], d["err_sum"], d["q_sum"], d["c_sum"]
            s.lat, s.q, s.c = _dense(d["lat"]), _dense(d["q"]), _dense(d["c"])
            s.batches = {k: [n, c] for k, n, c in d["batches"]}
            s.last = d["last"]
            for sec, n, e, lat in d["window"]:
                j = sec % WINDOW_S
                s.w_sec[j], s.w_n[j], s.w_err[j] = sec, n, e
                s.w_lat[j] = _dense(lat) if lat else None
            self._series[(m, v, r)] = s
            if v is not None:
                self._by_version.setdefault((m, v), []).append(s)
        for m, v, r, p, c, n in state["cells"]:
            s = self._series.get((m, v, r))
            if s is None:
                s = self._series[(m, v, r)] = Series(m, v, r)
                if v is not None:
                    self._by_version.setdefault((m, v), []).append(s)
            cell = self._cells[(m, v, r, p, c)] = _Cell(s, c == "OK")
            cell.n = n
        self._exec = {(m, v): {k: [n, c] for k, n, c in d} for m, v, d in state["exec"]}
        self._shadow = {}
        for m, p, v, n, fails, diff_n, diff_sum, diff_max, agree_n, agree_yes in state["shadow"]:
            st = self._shadow[(m, p, v)] = ShadowStats()
            st.n, st.fails, st.diff_n, st.diff_sum = n, fails, diff_n, diff_sum
            st.diff_max, st.agree_n, st.agree_yes = diff_max, agree_n, agree_yes
        self._shadow_dropped = {(m, v): n for m, v, n in state["shadow_dropped"]}
        self._retired = {(m, p, c): n for m, p, c, n in state["retired"]}
        self._exp_counts = {(k, m, key): n for k, m, key, n in state.get("experiment_counts", [])}

    def _experiment_counts(self) -> dict[tuple[str, str, str], int]:
        """(kind, model, key) -> n: imported (merged) ones, else the runner's published."""
        if self._exp_counts is not None:
            return self._exp_counts
        return dict(self.experiments().counts) if self.experiments is not None else {}

    def change_mark(self) -> tuple:
        """Cheap (O(keys)) and changes whenever a counter does: a worker writes its
        snapshot only when this moved."""
        return (sum(c.n for c in self._cells.values()),
                sum(b[0] for d in self._exec.values() for b in d.values()),
                sum(st.n + st.fails for st in self._shadow.values()),
                sum(self._shadow_dropped.values()), len(self._retired), len(self._series),
                sum(self._experiment_counts().values()))

    def merged(self) -> Metrics:
        """A read-only Metrics holding this process's counters plus every peer snapshot
        (summed by runtime.metrics.merge), reading the same views, router and clocks."""
        peers = self.peers() if self.peers is not None else []
        return self._copy(merge_states([self.export_state(), *peers]))

    def _copy(self, state: dict) -> Metrics:
        """A read-only Metrics holding `state`, with this one's views, router, clocks,
        lifecycle figures and experiment view."""
        out = Metrics(self.router, self.views, self.clock, self.wall, self.window_s,
                      self.retire_after_s)
        out.import_state(state)
        out._life, out._ended = self._life, self._ended
        out.experiments = self.experiments
        return out


def _sparse(counts: list[int] | None) -> list[list[int]]:
    return [] if counts is None else [[i, c] for i, c in enumerate(counts) if c]


def _dense(pairs: list[list[int]]) -> list[int]:
    out = [0] * NB
    for i, c in pairs:
        out[i] += c
    return out


def _cuda_allocated(device: str | None) -> int | None:
    """torch.cuda.memory_allocated of the version's device (every tenant of that device),
    read now; None off CUDA."""
    if not device or not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated(device))


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


class _Collector(Collector):
    """Builds every family from the Metrics' own arrays at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics.families()
