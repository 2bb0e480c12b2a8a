"""The fleet's bookkeeping (runtime/decider/fleet.py) without servers: the holder judges
the sum over pods of (latest totals - judged baseline), so a new holder that reads the
baseline from the Lease carries on exactly and a dead pod's judged counts are not judged
twice; pushes are validated whole; the states fit the Lease's annotation budget by
dropping the oldest decisions, said in the log."""

from __future__ import annotations

import json
import logging

import pytest

from runtime.decider.fleet import Fleet, fit_states, parse_push
from runtime.decider.lease_k8s import Lease
from runtime.decider.workers import zero_counts
from runtime.routing.k8s_api import KubeClient

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


def fleet(identity: str) -> Fleet:
    return Fleet(Lease(KubeClient("http://127.0.0.1:9"), "ns", "cm-decider", identity, 2), token=None)


def counts(n: int, errors: int = 0) -> list:
    c = zero_counts()
    c[0], c[1], c[2] = n, errors, n
    return c


def requests(cur: dict, base: dict) -> dict[int, int]:
    return {v: c[0] - base.get(str(v), zero_counts())[0] for v, c in cur.items()}


def test_the_holder_judges_each_pods_increments_once_and_a_new_holder_carries_on():
    a = fleet("pod-a-1")
    a.received("pod-b-1", {"mlp": {"1": counts(10), "2": counts(4)}})
    cur, base = a.judged_totals("mlp", {1: counts(7), 2: counts(3)})
    assert requests(cur, base) == {1: 17, 2: 7}
    a.received("pod-b-1", {"mlp": {"1": counts(12), "2": counts(4)}})
    cur, base = a.judged_totals("mlp", {1: counts(8), 2: counts(5)})
    assert requests(cur, base) == {1: 3, 2: 2}  # only what is new since the last judgment

    # a dies; c takes the Lease with the baseline a wrote; b keeps counting, a's pod is gone
    c = fleet("pod-c-1")
    c.baseline = json.loads(json.dumps(a.baseline))
    c.received("pod-b-1", {"mlp": {"1": counts(15), "2": counts(6)}})
    cur, base = c.judged_totals("mlp", {1: counts(1)})
    assert requests(cur, base) == {1: 3 + 1, 2: 2}  # b's increments and c's own, never a's again


def test_a_push_is_validated_whole():
    ok = {"identity": "pod-b-1", "models": {"mlp": {"1": counts(1)}}, "records": [["r1", "mlp", 1, "control"]]}
    assert parse_push(ok) == ("pod-b-1", ok["models"], [("r1", "mlp", 1, "control")])
    for bad, says in ((dict(ok, identity=""), "identity"), (dict(ok, models=[]), "models"),
                      (dict(ok, models={"mlp": {"x": counts(1)}}), "models.mlp.x"),
                      (dict(ok, models={"mlp": {"1": [1, 2]}}), "models.mlp.1"),
                      (dict(ok, records=[["r1", "mlp", "1", None]]), "records")):
        with pytest.raises(ValueError, match=says):
            parse_push(bad)


def test_states_fit_the_annotation_budget_by_dropping_the_oldest_decisions(caplog):
    decisions = [{"at": i, "action": "hold", "reason": "x" * 200} for i in range(100)]
    states = {"mlp": {"phase": "running", "decisions": decisions}, "b": {"phase": "running", "decisions": []}}
    assert json.loads(fit_states(states, 1 << 20)) == states
    with caplog.at_level(logging.WARNING, "splitserve.experiments"):
        text = fit_states(states, 5000)
    assert len(text.encode()) <= 5000
    kept = json.loads(text)["mlp"]["decisions"]
    assert 0 < len(kept) < 100 and kept == decisions[-len(kept):]  # the newest kept, in order
    assert states["mlp"]["decisions"] == decisions  # the caller's states untouched
    assert f"event=experiment_decisions_trimmed dropped={100 - len(kept)} " in caplog.text
    with pytest.raises(ValueError, match="without decisions"):
        fit_states({"m": {"phase": "x" * 100, "decisions": []}}, 50)


def test_silent_identities_are_forgotten_once_judged(monkeypatch):
    import runtime.decider.fleet as ef
    now = [100.0]
    monkeypatch.setattr(ef.time, "monotonic", lambda: now[0])
    f = fleet("pod-c-1")
    f.taken()  # the Lease's baseline: none here; then two pods, and one that died before we led
    f.baseline = {"pod-gone-1": {"mlp": {"1": counts(5)}}}
    f.received("pod-b-1", {"mlp": {"1": counts(3)}})
    f.received("pod-d-1", {"mlp": {"1": counts(2)}})
    f.judged_totals("mlp", {})
    now[0] += ef.PRUNE_S / 2
    f.received("pod-b-1", {"mlp": {"1": counts(4)}})  # b lives on; d goes silent with all judged
    f.judged_totals("mlp", {})
    assert set(f.baseline) == {"pod-gone-1", "pod-b-1", "pod-d-1", "pod-c-1"}
    now[0] += ef.PRUNE_S / 2 + 1
    cur, base = f.judged_totals("mlp", {})
    assert set(f.baseline) == {"pod-b-1", "pod-c-1"} and set(f.pushed) == {"pod-b-1"}
    assert requests(cur, base) == {1: 0}
