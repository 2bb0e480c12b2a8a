"""Merging raw-counter snapshots of several processes into one: a pure function.

Each worker (or replica) exports its counters with `Metrics.export_state()`; a reader
merges its own live state with the others' snapshots and answers from the merge, so any
worker gives the same totals. Counts, sums and histograms add; `last` takes the latest;
the recent-window ring keeps, per slot, the newest second any input holds and adds only
the inputs that hold that second (older seconds have left the window anyway); the largest
shadow difference takes the max. Inputs are plain dicts (JSON), so the same function
merges the snapshots of Kubernetes replicas. No torch, no I/O.

`SnapshotDir` is the file side for worker processes: one `<worker>-<pid>.json` per
process incarnation, written atomically (temp file + rename); a dead worker's last file
stays, so its counts are never lost when it is replaced.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("splitserve.metrics")

FORMAT = 1  # must equal runtime.metrics.STATE_FORMAT
MAX_SNAPSHOT_BYTES = 64 << 20  # a file larger than this is not ours: skipped


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

    out_series = []
    for (m, v, r), acc in series.items():
        # Keep the newest second per ring slot, as one process's ring would.
        slots: dict[int, int] = {}
        for sec in acc["window"]:
            j = sec % 60
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
    }


class SnapshotDir:
    """The run folder the supervisor made: each worker writes its own file there and
    reads everyone else's (live workers' latest and dead ones' last)."""

    def __init__(self, path: Path, worker: int, pid: int | None = None):
        self.path = Path(path)
        self.name = f"w{worker}-{pid or os.getpid()}.json"

    def write(self, state: dict) -> None:
        """Atomic: readers see the previous file or this one, never half of one."""
        data = json.dumps(state, separators=(",", ":")).encode()
        tmp = self.path / f".{self.name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path / self.name)

    def peers(self) -> list[dict]:
        out = []
        for p in sorted(self.path.glob("w*.json")):
            if p.name == self.name:
                continue  # our own counters are read live
            try:
                if p.stat().st_size > MAX_SNAPSHOT_BYTES:
                    continue
                st = json.loads(p.read_bytes())
            except (OSError, ValueError) as e:
                log.warning("event=metrics_snapshot_unreadable path=%s error=%r", p, e)
                continue
            if isinstance(st, dict) and st.get("format") == FORMAT:
                out.append(st)
        return out
