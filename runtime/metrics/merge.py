"""A store's counters as plain JSON-able state, the merge of several processes' states
into one, and the difference of two (a window of the A/B summary).

Each worker (or replica) exports its counters with `export_state(store)`; a reader
merges its own live state with the others' snapshots and answers from the merge
(`reading(store)`), so any worker gives the same totals. Counts, sums and histograms
add; `last` takes the latest; the recent-window ring keeps, per slot, the newest second
any input holds and adds only the inputs that hold that second (older seconds have left
the window anyway); the largest shadow difference takes the max. `merge_states` and `subtract_states` are pure functions
of plain dicts (JSON), so the same function merges the snapshots of Kubernetes replicas.
No torch, no I/O.

`SnapshotDir` is the file side for worker processes: one `<worker>-<pid>.json` per
process incarnation, written atomically (temp file + rename); a dead worker's last file
stays, so its counts are never lost when it is replaced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from runtime.files import read_peer_files, write_json_atomic
from runtime.histogram import NB
from runtime.metrics.store import WINDOW_S, Cell, Series, ShadowStats, Store

log = logging.getLogger("splitserve.metrics")

FORMAT = 1  # of export_state(); a reader refuses any other


def _add_pairs(acc: dict[int, int], pairs) -> None:
    for i, c in pairs:
        acc[i] = acc.get(i, 0) + c


def _pairs(acc: dict[int, int]) -> list[list[int]]:
    return [[i, c] for i, c in sorted(acc.items()) if c]


def _key(x) -> tuple:
    return tuple(x)


def merge_states(states: Iterable[dict]) -> dict:
    """One state (the export_state shape) holding the sum of `states`. Pure."""
    cells: dict[tuple, int] = {}
    series: dict[tuple, dict] = {}
    execs: dict[tuple, dict[int, list]] = {}
    shadow: dict[tuple, list] = {}
    dropped: dict[tuple, int] = {}
    retired: dict[tuple, int] = {}
    exp_counts: dict[tuple, int] = {}
    for st in states:
        if st.get("format") != FORMAT:
            raise ValueError(f"metrics state format {st.get('format')!r}, expected {FORMAT}")
        for *k, n in st["cells"]:
            k = _key(k)
            cells[k] = cells.get(k, 0) + n
        for m, v, r, d in st["series"]:
            acc = series.get((m, v, r))
            if acc is None:
                acc = series[(m, v, r)] = {
                    "n": 0, "err": 0, "inf": 0, "ok_sum": 0.0, "err_sum": 0.0, "q_sum": 0.0,
                    "c_sum": 0.0, "lat": {}, "q": {}, "c": {}, "batches": {}, "last": None,
                    "window": {}}
            for f in ("n", "err", "inf", "ok_sum", "err_sum", "q_sum", "c_sum"):
                acc[f] += d[f]
            for f in ("lat", "q", "c"):
                _add_pairs(acc[f], d[f])
            for k, n, c in d["batches"]:
                b = acc["batches"].setdefault(k, [0, 0.0])
                b[0] += n
                b[1] += c
            if d["last"] is not None and (acc["last"] is None or d["last"] > acc["last"]):
                acc["last"] = d["last"]
            for sec, n, e, lat in d["window"]:
                # one entry per second: seconds from different rings never mix
                w = acc["window"].setdefault(sec, [0, 0, {}])
                w[0] += n
                w[1] += e
                _add_pairs(w[2], lat)
        for m, v, d in st["exec"]:
            acc = execs.setdefault((m, v), {})
            for k, n, c in d:
                b = acc.setdefault(k, [0, 0.0])
                b[0] += n
                b[1] += c
        for m, p, v, n, fails, diff_n, diff_sum, diff_max, agree_n, agree_yes in st["shadow"]:
            acc = shadow.setdefault((m, p, v), [0, 0, 0, 0.0, None, 0, 0])
            acc[0] += n
            acc[1] += fails
            acc[2] += diff_n
            acc[3] += diff_sum
            if diff_max is not None and (acc[4] is None or diff_max > acc[4]):
                acc[4] = diff_max
            acc[5] += agree_n
            acc[6] += agree_yes
        for m, v, n in st["shadow_dropped"]:
            dropped[(m, v)] = dropped.get((m, v), 0) + n
        for m, p, c, n in st["retired"]:
            retired[(m, p, c)] = retired.get((m, p, c), 0) + n
        for *k, n in st.get("experiment_counts", ()):
            k = _key(k)
            exp_counts[k] = exp_counts.get(k, 0) + n

    out_series = []
    for (m, v, r), acc in series.items():
        # Keep the newest second per ring slot, as one process's ring would.
        slots: dict[int, int] = {}
        for sec in acc["window"]:
            j = sec % WINDOW_S
            if sec > slots.get(j, -1):
                slots[j] = sec
        window = [[sec, acc["window"][sec][0], acc["window"][sec][1], _pairs(acc["window"][sec][2])]
                  for sec in sorted(slots.values())]
        out_series.append([m, v, r, {
            **{f: acc[f] for f in ("n", "err", "inf", "ok_sum", "err_sum", "q_sum", "c_sum")},
            "lat": _pairs(acc["lat"]), "q": _pairs(acc["q"]), "c": _pairs(acc["c"]),
            "batches": [[k, b[0], b[1]] for k, b in sorted(acc["batches"].items())],
            "last": acc["last"], "window": window}])
    return {
        "format": FORMAT,
        "cells": [[*k, n] for k, n in cells.items()],
        "series": out_series,
        "exec": [[m, v, [[k, b[0], b[1]] for k, b in sorted(d.items())]]
                 for (m, v), d in execs.items()],
        "shadow": [[*k, *acc] for k, acc in shadow.items()],
        "shadow_dropped": [[*k, n] for k, n in dropped.items()],
        "retired": [[*k, n] for k, n in retired.items()],
        "experiment_counts": [[*k, n] for k, n in sorted(exp_counts.items())],
    }


def _minus_pairs(cur, base) -> list[list[int]]:
    acc: dict[int, int] = {}
    _add_pairs(acc, cur)
    for i, c in base:
        if i in acc:
            acc[i] -= c
    return [[i, c] for i, c in sorted(acc.items()) if c > 0]


def subtract_states(cur: dict, base: dict) -> dict:
    """The counters between `base` and `cur` (both export_state shapes, base taken
    earlier): a window of the A/B summary. Pure. Only `cur`'s keys are kept (a version
    retired since is gone) and no count goes below 0 (a restarted peer without a snapshot
    file). Not subtractable and so `cur`'s: the recent ring, `last`, the shadow maximum (all
    time, kept when comparisons were made in the window). A histogram `base` lacks (its
    checkpoints keep none for queue and compute) comes out empty, with its sum 0."""
    for st in (cur, base):
        if st.get("format") != FORMAT:
            raise ValueError(f"metrics state format {st.get('format')!r}, expected {FORMAT}")

    def minus(a, b):
        return max(0, a - b) if isinstance(a, int) and isinstance(b, int) else max(0.0, a - b)

    b_cells = {_key(k): n for *k, n in base["cells"]}
    b_series = {(m, v, r): d for m, v, r, d in base["series"]}
    b_exec = {(m, v): {k: (n, c) for k, n, c in d} for m, v, d in base["exec"]}
    b_shadow = {(m, p, v): rest for m, p, v, *rest in base["shadow"]}
    b_dropped = {(m, v): n for m, v, n in base["shadow_dropped"]}
    b_retired = {(m, p, c): n for m, p, c, n in base["retired"]}
    series = []
    for m, v, r, d in cur["series"]:
        b = b_series.get((m, v, r), {})
        out = dict(d)
        for f in ("n", "err", "inf", "err_sum"):
            out[f] = minus(d[f], b.get(f, 0))
        for f, fsum in (("lat", "ok_sum"), ("q", "q_sum"), ("c", "c_sum")):
            if f == "lat" or f in b:
                out[f] = _minus_pairs(d[f], b.get(f, ()))
                out[fsum] = minus(d[fsum], b.get(fsum, 0.0))
            else:
                out[f], out[fsum] = [], 0.0
        bb = {k: (n, c) for k, n, c in b.get("batches", ())}
        out["batches"] = [[k, n - bb.get(k, (0, 0.0))[0], max(0.0, c - bb.get(k, (0, 0.0))[1])]
                          for k, n, c in d["batches"] if n > bb.get(k, (0, 0.0))[0]]
        series.append([m, v, r, out])
    shadow = []
    for m, p, v, n, fails, diff_n, diff_sum, diff_max, agree_n, agree_yes in cur["shadow"]:
        bn, bfails, bdiff_n, bdiff_sum, _bmax, bagree_n, bagree_yes = b_shadow.get(
            (m, p, v), (0, 0, 0, 0.0, None, 0, 0))
        dn = minus(diff_n, bdiff_n)
        shadow.append([m, p, v, minus(n, bn), minus(fails, bfails), dn, minus(diff_sum, bdiff_sum),
                       diff_max if dn else None, minus(agree_n, bagree_n), minus(agree_yes, bagree_yes)])
    execs = []
    for m, v, d in cur["exec"]:
        be = b_exec.get((m, v), {})
        execs.append([m, v, [[k, n - be.get(k, (0, 0.0))[0], max(0.0, c - be.get(k, (0, 0.0))[1])]
                             for k, n, c in d if n > be.get(k, (0, 0.0))[0]]])
    return {
        "format": FORMAT,
        "cells": [[*k, minus(n, b_cells.get(_key(k), 0))] for *k, n in cur["cells"]],
        "series": series,
        "exec": execs,
        "shadow": shadow,
        "shadow_dropped": [[m, v, minus(n, b_dropped.get((m, v), 0))] for m, v, n in cur["shadow_dropped"]],
        "retired": [[m, p, c, minus(n, b_retired.get((m, p, c), 0))] for m, p, c, n in cur["retired"]],
        "experiment_counts": cur.get("experiment_counts", []),
    }


# ---- a store's counters as JSON-able values (worker processes, replicas) ----------------
def export_state(store: Store, model: str | None = None) -> dict:
    """Every counter `store` recorded (of `model` only, when given), as plain lists and
    numbers (no pickle): what a worker writes to its snapshot file. Histograms are sparse
    [index, count] pairs. Lifecycle figures stay per process (every worker loads every
    version)."""
    store.retire()

    def mine(m: str) -> bool:
        return model is None or m == model

    series = []
    for (m, v, r), s in store.series.items():
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
        "format": FORMAT,
        "cells": [[m, v, r, p, c, cell.n] for (m, v, r, p, c), cell in store.cells.items()
                  if mine(m)],
        "series": series,
        "exec": [[m, v, [[k, b[0], b[1]] for k, b in d.items()]]
                 for (m, v), d in store.execs.items() if mine(m)],
        "shadow": [[m, p, v, st.n, st.fails, st.diff_n, st.diff_sum, st.diff_max,
                    st.agree_n, st.agree_yes] for (m, p, v), st in store.shadow.items()
                   if mine(m)],
        "shadow_dropped": [[m, v, n] for (m, v), n in store.shadow_dropped.items() if mine(m)],
        "retired": [[m, p, c, n] for (m, p, c), n in store.retired.items() if mine(m)],
        "experiment_counts": [[k, m, key, n] for (k, m, key), n in
                              sorted(store.experiment_counts().items()) if mine(m)],
    }


def import_state(store: Store, state: dict) -> None:
    """Replace `store`'s counters with `state` (the shape export_state writes)."""
    if state.get("format") != FORMAT:
        raise ValueError(f"metrics state format {state.get('format')!r}, expected {FORMAT}")
    store.cells, store.series, store.by_version = {}, {}, {}
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
        store.series[(m, v, r)] = s
        if v is not None:
            store.by_version.setdefault((m, v), []).append(s)
    for m, v, r, p, c, n in state["cells"]:
        s = store.series.get((m, v, r))
        if s is None:
            s = store.series[(m, v, r)] = Series(m, v, r)
            if v is not None:
                store.by_version.setdefault((m, v), []).append(s)
        cell = store.cells[(m, v, r, p, c)] = Cell(s, c == "OK")
        cell.n = n
    store.execs = {(m, v): {k: [n, c] for k, n, c in d} for m, v, d in state["exec"]}
    store.shadow = {}
    for m, p, v, n, fails, diff_n, diff_sum, diff_max, agree_n, agree_yes in state["shadow"]:
        st = store.shadow[(m, p, v)] = ShadowStats()
        st.n, st.fails, st.diff_n, st.diff_sum = n, fails, diff_n, diff_sum
        st.diff_max, st.agree_n, st.agree_yes = diff_max, agree_n, agree_yes
    store.shadow_dropped = {(m, v): n for m, v, n in state["shadow_dropped"]}
    store.retired = {(m, p, c): n for m, p, c, n in state["retired"]}
    store.exp_counts = {(k, m, key): n for k, m, key, n in state.get("experiment_counts", [])}


def copy(store: Store, state: dict) -> Store:
    """A read-only Store holding `state`, with `store`'s views, router, clocks, lifecycle
    figures and experiment view (and no peers)."""
    out = Store(store.router, store.views, store.clock, store.wall, store.window_s,
                store.retire_after_s, experiments=store.experiments)
    import_state(out, state)
    out.life, out.ended_at = store.life, store.ended_at
    return out


def reading(store: Store) -> Store:
    """What a reader reads: `store` itself, retired first; with worker peers, a read-only
    copy holding this process's counters plus every peer snapshot."""
    if store.peers is None:
        store.retire()
        return store
    return copy(store, merge_states([export_state(store), *store.peers()]))


def _sparse(counts: list[int] | None) -> list[list[int]]:
    return [] if counts is None else [[i, c] for i, c in enumerate(counts) if c]


def _dense(pairs: list[list[int]]) -> list[int]:
    out = [0] * NB
    for i, c in pairs:
        out[i] += c
    return out


class SnapshotDir:
    """The run folder the supervisor made: each worker writes its own file there and
    reads everyone else's (live workers' latest and dead ones' last)."""

    def __init__(self, path: Path, worker: int, pid: int | None = None):
        self.path = Path(path)
        self.name = f"w{worker}-{pid or os.getpid()}.json"

    def write(self, state: dict) -> None:
        write_json_atomic(self.path / self.name, state)

    def peers(self) -> list[dict]:
        # our own counters are read live
        return [st for st in read_peer_files(self.path, "w*.json", self.name, "metrics_snapshot")
                if st.get("format") == FORMAT]
