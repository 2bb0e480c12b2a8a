"""Per-version metrics, the recording side: exact counts and latency histograms by the
version that served, plus the reads every reader shares.

`Store` is what the hot path writes (`record_*`, `lifecycle_event`, on the event loop,
so nothing is locked) and what the readers read: the A/B summary (`summary.py`), the
Prometheus families (`prometheus.py`), Triton's statistics (`statistics.py`) and the
state a worker shares (`merge.py`). Its counters are public attributes for those readers;
only this module writes them, except `merge.import_state`, which replaces them whole.

The hot path (`record_request`) is O(1): one dict lookup on the full label tuple, a few
integer additions and three `bisect`s into fixed log-spaced bucket edges (48 per decade,
about 4.9 % wide, plus the exported Prometheus bounds as exact edges). Percentiles are
computed on read by interpolating inside a bucket, so they are accurate to a few percent.
The recent window is a ring of per-second bucket arrays, rotated lazily on write by
integer second arithmetic on the injectable `clock`.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

from runtime.histogram import EDGES, NB
from runtime.views import ExperimentsView, LifecycleEvent, Snapshot, VersionView

log = logging.getLogger("splitserve.metrics")

WINDOW_S = 60
RETIRE_AFTER_S = 300.0  # an ENDed version's series leave the scrape this long after
UNKNOWN_MODEL = "_unknown"  # label for requests naming no model we know (not a valid name)
ROUTED = ("split", "sticky")  # routes that follow the weights: what observed share counts


def merge_counts(arrays: Iterable[list[int] | None]) -> list[int]:
    """Fine-bucket histograms added bucket by bucket."""
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return [0] * NB
    if len(arrays) == 1:
        return list(arrays[0])
    return [sum(col) for col in zip(*arrays)]


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


class Cell:
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


class Store:
    """Records requests, shadow comparisons, executed batches and lifecycle events.

    `views` returns the manager's published `Snapshot` (states, in-flight counts, memory
    at read time); `clock` (seconds, monotonic) drives the recent window and retirement;
    `wall` (epoch seconds) only turns the last request time into Triton's
    `last_inference`. A version's series are retired `retire_after_s` after it ENDed (so
    scrapes do not grow forever); their counts fold into the model totals
    (`splitserve_model_requests`), which never go down.

    `experiments` returns the ExperimentRunner's published view: its counts are exported
    with ours and summed across processes. `peers` (worker processes) returns the other
    workers' raw-counter snapshots; every reader then answers the merged totals
    (`merge.reading`).
    """

    def __init__(self, router=None, views: Callable[[], Snapshot] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, window_s: int = WINDOW_S,
                 retire_after_s: float = RETIRE_AFTER_S,
                 experiments: Callable[[], ExperimentsView] | None = None,
                 peers: Callable[[], list[dict]] | None = None):
        if not 0 < window_s <= WINDOW_S:
            raise ValueError(f"window_s must be in 1..{WINDOW_S}")
        self.router = router
        self.views = views or (lambda: Snapshot())
        self.retire_after_s = retire_after_s
        self.clock = clock
        self.wall = wall
        self.window_s = window_s
        self.experiments = experiments
        self.peers = peers
        self.cells: dict[tuple, Cell] = {}
        self.series: dict[tuple, Series] = {}
        self.by_version: dict[tuple[str, int], list[Series]] = {}
        self.execs: dict[tuple[str, int], dict[int, list]] = {}  # from record_batch
        self.shadow: dict[tuple[str, int, int], ShadowStats] = {}
        self.life: dict[tuple[str, int], Lifecycle] = {}
        self.shadow_dropped: dict[tuple[str, int], int] = {}
        self.ended_at: dict[tuple[str, int], float] = {}  # clock() of END, until retired
        self.retired: dict[tuple[str, str, str], int] = {}  # (model, protocol, code) -> n
        self.exp_counts: dict[tuple[str, str, str], int] | None = None  # imported (merged) counts

    # ---- hot path (event loop) -----------------------------------------------------
    def record_request(self, model: str, version: int | None, route: str, protocol: str,
                       code: str, latency_s: float, queue_s: float, compute_s: float,
                       batch: int) -> None:
        """One finished request (code "OK" or an errors.Code value), by the version that
        served it (None when it never reached one). Durations in seconds."""
        if version is None and not self.model_known(model):
            model = UNKNOWN_MODEL  # client-chosen names must not grow the label set
        cell = self.cells.get((model, version, route, protocol, code))
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

    def _new_cell(self, model, version, route, protocol, code) -> Cell:
        skey = (model, version, route)
        s = self.series.get(skey)
        if s is None:
            s = self.series[skey] = Series(model, version, route)
            if version is not None:
                self.by_version.setdefault((model, version), []).append(s)
        cell = self.cells[(model, version, route, protocol, code)] = Cell(s, code == "OK")
        return cell

    def record_batch(self, model: str, version: int, size: int, compute_s: float) -> None:
        """One executed batch (for a dynamic batcher). Once a version reports batches,
        its execution count and batch statistics come from here, not from requests."""
        d = self.execs.get((model, version))
        if d is None:
            d = self.execs[(model, version)] = {}
        b = d.get(size)
        if b is None:
            b = d[size] = [0, 0.0]
        b[0] += 1
        b[1] += compute_s

    def record_shadow(self, model: str, primary: int, shadow: int, ok: bool,
                      max_abs_diff: float | None, argmax_agree: bool | None) -> None:
        st = self.shadow.get((model, primary, shadow))
        if st is None:
            st = self.shadow[(model, primary, shadow)] = ShadowStats()
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
        self.shadow_dropped[key] = self.shadow_dropped.get(key, 0) + 1

    def lifecycle_event(self, ev: LifecycleEvent) -> None:
        """From the manager: "loaded", "failed" or "unloaded" for one version."""
        key = (ev.model, ev.version)
        life = self.life.get(key)
        if life is None:
            life = self.life[key] = Lifecycle()
        if ev.kind == "loaded":
            life.load_s, life.warmup_s = ev.load_s, ev.warmup_s
            life.device, life.memory_bytes = ev.device, ev.memory_bytes
            self.ended_at.pop(key, None)
        elif ev.kind == "failed":
            life.failures += 1
            life.last_error = ev.error
        elif ev.kind == "unloaded":
            self.ended_at[key] = self.clock()

    # ---- retirement of ended versions ----------------------------------------------
    def retire(self) -> None:
        """Drop the series of versions ENDed more than retire_after_s ago (called on
        read); their request counts move into the model totals."""
        if not self.ended_at:
            return
        now = self.clock()
        snap = self.views()
        for key, at in list(self.ended_at.items()):
            if now - at < self.retire_after_s:
                continue
            model, version = key
            mv = snap.model(model)
            vv = mv.version(version) if mv is not None else None
            if vv is not None and vv.state.value != "END":
                continue  # it came back
            del self.ended_at[key]
            for ck in [k for k in self.cells if k[0] == model and k[1] == version]:
                cell = self.cells.pop(ck)
                rk = (model, ck[3], ck[4])
                self.retired[rk] = self.retired.get(rk, 0) + cell.n
            for sk in [k for k in self.series if k[0] == model and k[1] == version]:
                del self.series[sk]
            self.by_version.pop(key, None)
            self.execs.pop(key, None)
            self.life.pop(key, None)
            self.shadow_dropped.pop(key, None)
            for shk in [k for k in self.shadow if k[0] == model and version in k[1:]]:
                del self.shadow[shk]
            log.info("event=metrics_retired model=%s version=%d", model, version)

    # ---- reads: shared helpers -----------------------------------------------------
    def model_known(self, model: str) -> bool:
        if self.views().model(model) is not None:
            return True
        return any(m == model for (m, _v) in self.by_version)

    def model_names(self) -> list[str]:
        names = {m for (m, _v) in self.by_version}
        names.update(self.views().names())
        return sorted(names)

    def statuses(self, model: str) -> dict[int, VersionView]:
        mv = self.views().model(model)
        return {} if mv is None else {v.version: v for v in mv.versions}

    def memory(self, model: str, version: int) -> int:
        v = self.statuses(model).get(version)
        return v.memory_bytes if v is not None else 0

    def executions(self, model: str, version: int) -> dict[int, list]:
        """Executed batch size -> [count, compute seconds]."""
        d = self.execs.get((model, version))
        if d is not None:
            return d
        out: dict[int, list] = {}
        for s in self.by_version.get((model, version), ()):
            for size, (n, c) in s.batches.items():
                b = out.setdefault(size, [0, 0.0])
                b[0] += n
                b[1] += c
        return out

    def last_epoch_ms(self, series: Iterable[Series]) -> int:
        last = max((s.last for s in series if s.last is not None), default=None)
        if last is None:
            return 0
        return int((self.wall() - (self.clock() - last)) * 1000)

    def weights(self, model: str) -> tuple[dict[int, float] | None, dict[int, float], dict[int, list[str]]]:
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

    def experiment_counts(self) -> dict[tuple[str, str, str], int]:
        """(kind, model, key) -> n: imported (merged) ones, else the runner's published."""
        if self.exp_counts is not None:
            return self.exp_counts
        return dict(self.experiments().counts) if self.experiments is not None else {}

    def change_mark(self) -> tuple:
        """Cheap (O(keys)) and changes whenever a counter does: a worker writes its
        snapshot only when this moved."""
        return (sum(c.n for c in self.cells.values()),
                sum(b[0] for d in self.execs.values() for b in d.values()),
                sum(st.n + st.fails for st in self.shadow.values()),
                sum(self.shadow_dropped.values()), len(self.retired), len(self.series),
                sum(self.experiment_counts().values()))

