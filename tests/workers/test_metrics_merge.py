"""The merge of raw-counter snapshots: two processes that split a stream of requests
between them answer exactly what one process that saw the whole stream answers, on
every surface (Triton statistics, A/B summary, Prometheus text)."""

from __future__ import annotations

import json
import random

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import RouteConfig, Router
from runtime.metrics.facade import Metrics
from runtime.metrics.merge import SnapshotDir, merge_states
from runtime.types import VersionState
from runtime.views import ModelView, Snapshot, VersionView

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _views():
    vs = tuple(VersionView(v, VersionState.AVAILABLE, None, 0.0, None, "model.pt2", "cpu", 1000)
               for v in (1, 2))
    return Snapshot(1, {"m": ModelView("m", vs, frozenset({1, 2}))})


def _trio(clock, peers=None):
    """(a, b, whole): a reads `peers` (the other workers' snapshots), b and whole none."""
    router = Router({"m": RouteConfig.from_json({"labels": {"stable": 1, "canary": 2},
                                                 "weights": {"stable": 7, "canary": 3}})})
    router.set_available("m", [1, 2])
    return [Metrics(router, views=_views, clock=clock, wall=lambda: 5e5, peers=p)
            for p in (peers, None, None)]


def _samples(m) -> set:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items())), s.value)
            for f in text_string_to_metric_families(text) for s in f.samples}


def _dy(rng, scale):
    """A dyadic value (k / 2**n): float sums of these are exact in any order."""
    return rng.randrange(1, 4096) / scale


def _feed(ms, clock, n=600, seed=7):
    """Each event goes to one of ms[0], ms[1] and always to ms[2] (the whole stream)."""
    rng = random.Random(seed)
    for i in range(n):
        clock.t += rng.random() * 0.3  # spans more than the 60 s window
        part = ms[rng.randrange(2)]
        v = rng.choice((1, 2))
        route = rng.choice(("split", "sticky", "pinned", "shadow"))
        code = "OK" if rng.random() < 0.9 else "INTERNAL"
        args = ("m", v, route, rng.choice(("rest_v2", "grpc")), code,
                _dy(rng, 1 << 14), _dy(rng, 1 << 20), _dy(rng, 1 << 20),
                rng.choice((1, 2, 4)))
        diff, agree = _dy(rng, 1 << 10), rng.random() < 0.8
        for m in (part, ms[2]):
            m.record_request(*args)
            if i % 5 == 0:
                m.record_batch("m", v, 4, 0.001)
            if i % 7 == 0:
                m.record_shadow("m", 1, 2, True, diff, agree)
            if i % 11 == 0:
                m.record_shadow_dropped("m", 2)
        if i % 97 == 0:  # a request for a model nobody knows
            for m in (part, ms[2]):
                m.record_request("nope", None, "split", "rest_v2", "NOT_FOUND", 1e-4, 0, 0, 0)


def test_two_halves_merge_to_the_whole_on_every_surface():
    clock = Clock()
    snaps = []
    a, b, whole = _trio(clock, peers=lambda: snaps)
    _feed((a, b, whole), clock)
    # JSON round trip: what a worker writes to its file is what a reader merges
    snaps.append(json.loads(json.dumps(b.export_state())))
    assert a.statistics() == whole.statistics()
    assert a.statistics("m", "2") == whole.statistics("m", "2")
    sa, sw = a.summary("m"), whole.summary("m")
    assert sa == sw
    assert sum(r["requests"] for r in sa["versions"]) > 0
    assert _samples(a) == _samples(whole) and len(_samples(whole)) > 100
    # b alone does not read a: its own figures are only its half
    assert b.statistics() != whole.statistics()


def test_a_window_baseline_is_taken_from_the_merged_totals():
    """since=routing on worker a subtracts what every worker had counted at the change:
    a baseline from a's own counters would leave b's earlier traffic in the window."""
    clock = Clock()
    a, b, whole = _trio(clock, peers=lambda: [json.loads(json.dumps(b.export_state()))])
    router = a.router
    for m in (a, whole):
        router.subscribe(m.routing_changed)
    _feed((a, b, whole), clock, n=300, seed=5)
    router.set_config("m", RouteConfig.from_json({"labels": {"stable": 1, "canary": 2},
                                                  "weights": {"stable": 1, "canary": 1}}))
    _feed((a, b, whole), clock, n=200, seed=6)
    sa, sw = a.summary("m"), whole.summary("m")
    assert sa == sw
    counted = sum(r["requests"] for r in sw["versions"])
    assert 0 < counted < sum(r["requests"] for r in whole.summary("m", "start")["versions"])
    assert a.summary("m", "start") == whole.summary("m", "start")


def test_merge_is_order_free_and_counts_add():
    clock = Clock()
    a, b, whole = _trio(clock)
    _feed((a, b, whole), clock, n=200, seed=3)
    ea, eb = a.export_state(), b.export_state()
    m1, m2 = Metrics(), Metrics()
    m1.import_state(merge_states([ea, eb]))
    m2.import_state(merge_states([eb, ea]))
    assert m1.statistics() == m2.statistics()
    total = sum(c[-1] for c in merge_states([ea, eb])["cells"])
    assert total == sum(c[-1] for c in whole.export_state()["cells"]) == 200 + 3


def test_a_foreign_format_is_refused():
    with pytest.raises(ValueError, match="format"):
        merge_states([{"format": 99}])
    with pytest.raises(ValueError, match="format"):
        Metrics().import_state({"format": None})


def test_snapshot_dir_keeps_a_dead_incarnations_file(tmp_path):
    clock = Clock()
    a, b, whole = _trio(clock, peers=lambda: me.peers())  # me: this worker's run folder, below
    _feed((a, b, whole), clock, n=100)
    old = SnapshotDir(tmp_path, 1, pid=111)
    old.write(b.export_state())  # then worker 1 (pid 111) dies
    new = SnapshotDir(tmp_path, 1, pid=222)
    new.write(Metrics().export_state())
    (tmp_path / "w9-1.json").write_text("{not json")  # skipped with a warning
    me = SnapshotDir(tmp_path, 0, pid=333)
    me.write(a.export_state())
    peers = me.peers()
    assert len(peers) == 2  # worker 1's two incarnations, not our own file
    assert a.statistics() == whole.statistics()
    assert not list(tmp_path.glob(".*.tmp"))
