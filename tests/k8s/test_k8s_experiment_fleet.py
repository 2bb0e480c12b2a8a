"""One experiment decider across three replicas of a `kubernetes://` routing ConfigMap:
three `splitserve serve` processes (tools/serverproc.py, each its own port) against the
loopback API server (tests/k8s/kubeapi.py), real clients, a canary whose model.py fails
on bad inputs. Exactly one process takes the Lease and decides on all three's traffic;
feedback posted to one follower for a request another follower served is matched once,
then duplicate; every replica shows the same experiment; after kill -9 of the holder
another process takes the Lease when it expires and carries on exactly (counts neither
lost nor twice); the failing canary is rolled back once; after kill -9 of that holder and
a restart of every replica the state and its latch are intact (no second rollback)."""

from __future__ import annotations

import collections
import json
import re
import time

import httpx
import pytest

from conftest import wait_until
from kubeapi import KubeAPI
from tests.e2e.test_experiment_e2e import AUTH, FLAKY, TOKEN, body
from tools.serverproc import ServerProcess

pytestmark = pytest.mark.slow

NS, CM, KEY = "serving", "splitserve-routing", "splitserve.yaml"
LEASE = f"{CM}-decider"
SHOWN = ("state", "step", "candidate_weight", "latch", "control", "candidate", "outcomes", "decisions")


def doc_text(lease_s: float = 2) -> str:
    exp = {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 0.3,
           "min_requests": 10_000, "min_duration_s": 0, "guardrails": {"errors": {"max_ratio": 1.5}},
           "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}
    return json.dumps({"server": {"experiment_lease_s": lease_s},
                       "models": {"mlp": {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100},
                                          "sticky": {"header": "x-user-id"}, "experiment": exp}}})


@pytest.fixture
def api(tmp_path):
    a = KubeAPI(token="sa-token")
    (tmp_path / "token").write_text("sa-token\n")
    a.put(NS, CM, {KEY: doc_text()})
    yield a
    a.close()


@pytest.fixture
def fleet(api, make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    (repo / "mlp" / "2" / "model.py").write_text(FLAKY)
    started: list[ServerProcess] = []

    def start(n: int, tag: str) -> list[ServerProcess]:
        procs = [ServerProcess(repo, "--token", TOKEN, config=f"kubernetes://{NS}/{CM}",
                               env={"SPLITSERVE_KUBE_API": api.url, "HOSTNAME": f"pod-{tag}{k}",
                                    "SPLITSERVE_KUBE_TOKEN_FILE": str(tmp_path / "token")},
                               log_path=tmp_path / f"{tag}{k}.log") for k in range(n)]
        started.extend(procs)
        return [p.wait_ready(240) for p in procs]
    yield start
    for p in started:
        p.stop()


def experiment(srv) -> dict:
    r = httpx.get(f"{srv.url}/v1/models/mlp/experiment", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def same_on(procs, pred):
    """Every replica's view satisfies pred and all show the same experiment: that view, else None."""
    views = [experiment(p) for p in procs]
    shown = [{k: v.get(k) for k in SHOWN} for v in views]
    return views[0] if all(pred(v) for v in views) and all(s == shown[0] for s in shown) else None


def eventually(fn, timeout: float):
    box = []
    wait_until(lambda: box.append(fn()) or box[-1], timeout)
    return box[-1]


def deciders(procs) -> list[int]:
    """Indexes of the processes that logged taking the Lease (one entry per time taken)."""
    return [i for i, p in enumerate(procs) for line in p.lines() if "event=experiment_decider " in line]


def rollbacks(procs) -> int:
    return sum(bool(re.search(r"event=experiment_decision model=mlp action=rollback", x))
               for p in procs for x in p.lines())


def infer(srv, i: int, bad: bool = False) -> tuple[int, str | None, str | None]:
    r = httpx.post(f"{srv.url}/v2/models/mlp/infer", content=body(bad), timeout=30,
                   headers={"x-user-id": f"user-{i}", "content-type": "application/json"})
    return r.status_code, r.headers.get("x-model-version"), r.headers.get("x-request-id")


def feedback(srv, items) -> dict:
    r = httpx.post(f"{srv.url}/v1/models/mlp/feedback", json={"items": items}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def traffic_judged_as_the_sum(procs, n: int):
    """`n` requests spread over every process: (served as (process, code, version, request
    id), the count per version, the view) once every process shows them judged as one sum."""
    served = [(k % len(procs), *infer(procs[k % len(procs)], k)) for k in range(n)]
    assert all(code == 200 for _, code, _, _ in served), served
    by_version = collections.Counter(v for _, _, v, _ in served)
    view = eventually(lambda: same_on(procs, lambda v: total(v) == n), 30)
    assert view, [experiment(p) for p in procs]
    assert (view["control"]["requests"], view["candidate"]["requests"]) == (by_version["1"], by_version["2"])
    return served, by_version, view


def fail_canary_until_rolled_back(procs) -> dict:
    """Half the requests fail (on either version) until the experiment rolls back; the
    view once every process in `procs` shows the rollback and its guardrail latch."""
    i = 1000
    while experiment(procs[0])["state"] != "rolled_back" and i < 4000:
        for _ in range(30):
            infer(procs[i % len(procs)], i, bad=i % 2 == 0)
            i += 1
    view = eventually(lambda: same_on(procs, lambda v: v["state"] == "rolled_back")
                      if all(canary_weight(p) == 0 for p in procs) else None, 30)
    assert view and view["latch"].startswith("errors: canary had "), (experiment(procs[0]), [canary_weight(p) for p in procs])
    return view


def canary_weight(srv) -> float:
    """The canary's weight in the routing this process applies (the experiment view shows
    the decider's state, which a process can read before its routing reload lands)."""
    r = httpx.get(f"{srv.url}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["weights"].get("canary", 0)


def started(v: dict) -> bool:
    """The holder's first judgment is made: requests sent from now on are counted (before it
    every replica shows the first step with no decision, and that judgment judges them away)."""
    return bool(v["decisions"]) and v["candidate_weight"] == 50


def total(v: dict) -> int:
    return v["control"]["requests"] + v["candidate"]["requests"]


def test_one_decider_across_three_replicas_survives_kill_9_and_a_restart_of_all(api, fleet):
    t0 = time.monotonic()
    procs = fleet(3, "a")
    assert eventually(lambda: same_on(procs, lambda v: v["state"] in ("running", "holding") and started(v)), 30), \
        [experiment(p) for p in procs]
    assert len(deciders(procs)) == 1, [p.log_text(20) for p in procs]
    (lead,) = deciders(procs)
    followers = [i for i in range(3) if i != lead]
    holder = api.lease(NS, LEASE)
    assert holder["spec"]["holderIdentity"].startswith(f"pod-a{lead}-")
    assert holder["metadata"]["annotations"]["splitserve.io/decider-url"] == procs[lead].url

    # Traffic at every replica: judged once, by the holder, as the sum of all three.
    served, by_version, view = traffic_judged_as_the_sum(procs, 90)
    assert view["control"]["units"] + view["candidate"]["units"] == 90

    # Feedback at one follower for requests the other follower served: matched, then duplicate.
    # (Every second request of each follower keeps its feedback for after the holder dies.)
    f0, f1 = followers
    click = {rid: {"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for _, _, v, rid in served}
    later = {k: [click[rid] for n, (at, _, _, rid) in enumerate(served) if at == k and n % 2] for k in followers}
    items = [click[rid] for n, (at, _, _, rid) in enumerate(served) if at == f1 and not n % 2]
    assert feedback(procs[f0], items) == {"matched": len(items), "unknown": 0, "duplicate": 0}
    assert feedback(procs[f1], items) == {"matched": 0, "unknown": 0, "duplicate": len(items)}
    others = [click[rid] for n, (at, _, _, rid) in enumerate(served) if at == lead or (at == f0 and not n % 2)]
    assert feedback(procs[lead], others) == {"matched": len(others), "unknown": 0, "duplicate": 0}
    for k in range(5):  # at once: the holder waits for f1's next push before calling it unknown
        code, v, rid = infer(procs[f1], 500 + k)
        assert code == 200 and feedback(procs[f0], [click.setdefault(rid, {"request_id": rid, "metric": "click",
                                                                           "value": 1 if v == "2" else 0})]) == \
            {"matched": 1, "unknown": 0, "duplicate": 0}
        by_version[v] += 1
    assert feedback(procs[f1], [{"request_id": "never-served", "metric": "click", "value": 1}]) == \
        {"matched": 0, "unknown": 1, "duplicate": 0}
    r = httpx.post(f"{procs[f0].url}/v1/experiments/peers", json={"op": "push"}, timeout=10)
    assert r.status_code == 401  # the replicas' endpoint is a state change: token-protected
    view = eventually(lambda: same_on(procs, lambda v: bool(v["outcomes"]) and
                                      v["outcomes"][0]["control"]["n"] + v["outcomes"][0]["candidate"]["n"] == 65), 30)
    assert view, experiment(procs[f0])

    # kill -9 the holder: a follower takes the Lease once it expires and carries on exactly
    # (the dead pod's judged counts are not judged again, none of the others' are lost).
    killed_at = time.monotonic()
    procs[lead].kill()
    survivors = [procs[k] for k in followers]
    assert wait_until(lambda: len(deciders(procs)) == 2, 30), [p.log_text(20) for p in survivors]
    took = time.monotonic() - killed_at
    (lead2,) = [k for k in deciders(procs) if k != lead]
    assert lead2 in followers and api.lease(NS, LEASE)["spec"]["leaseTransitions"] == 1
    more = [infer(survivors[k % 2], 20_000 + k) for k in range(40)]
    assert all(code == 200 for code, _, _ in more)
    by_version.update(v for _, v, _ in more)
    view = eventually(lambda: same_on(survivors, lambda v: total(v) == 135), 30)
    assert view, [experiment(p) for p in survivors]
    assert (view["control"]["requests"], view["candidate"]["requests"]) == (by_version["1"], by_version["2"])
    # Feedback for what the survivors served before the holder died: the new holder has the
    # records of both (the other follower pushed all it remembers to the new holder).
    other = [k for k in followers if k != lead2][0]
    assert feedback(procs[lead2], later[other]) == {"matched": 15, "unknown": 0, "duplicate": 0}
    assert feedback(procs[other], later[lead2]) == {"matched": 15, "unknown": 0, "duplicate": 0}
    view = eventually(lambda: same_on(survivors, lambda v: v["outcomes"][0]["control"]["n"] +
                                      v["outcomes"][0]["candidate"]["n"] == 95), 30)
    assert view, [experiment(p) for p in survivors]

    # A failing canary: rolled back once, by the holder, shown alike everywhere.
    view = fail_canary_until_rolled_back(survivors)
    assert rollbacks(procs) == 1 and [d["action"] for d in view["decisions"]].count("rollback") == 1
    assert {infer(survivors[k % 2], 9000 + k)[1] for k in range(12)} == {"1"}  # no routed traffic on the canary

    # kill -9 the holder again and stop the other: two new replicas take the Lease after it
    # expires; the state and its latch are the Lease's, not a process's; no second rollback.
    procs[lead2].kill()
    for k in followers:
        if k != lead2:
            assert procs[k].stop() == 0, procs[k].log_text(30)
    again = fleet(2, "b")
    shown = eventually(lambda: same_on(again, lambda v: v["state"] == "rolled_back"), 30)
    assert shown and shown["latch"] == view["latch"] and shown["decisions"] == view["decisions"]
    assert wait_until(lambda: len(deciders(again)) == 1, 30)
    follower = again[1 - deciders(again)[0]]  # its actions go to the holder; errors come back as they are
    r = httpx.post(f"{follower.url}/v1/models/mlp/experiment/resume", headers=AUTH, timeout=30)
    assert r.status_code == 409 and "retry first" in r.json()["error"], r.text
    r = httpx.post(f"{follower.url}/v1/experiments/peers", headers=AUTH, json={"op": "push", "identity": ""})
    assert r.status_code == 400 and "identity" in r.json()["error"], r.text  # bad input, at any replica
    r = httpx.post(f"{follower.url}/v1/models/mlp/experiment/retry", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert eventually(lambda: same_on(again, lambda v: v["latch"] is None and v["candidate_weight"] == 50), 30)
    assert rollbacks(procs + again) == 1
    print(f"\nfleet: takeover after kill -9 in {took:.1f}s (lease 2 s); whole test {time.monotonic() - t0:.0f}s")


def test_a_replica_with_workers_is_one_pod_in_the_fleet(api, make_repo, tmp_path):
    """`--workers 2` in one replica, one worker in the other: the pod's flock holder takes
    part for its pod (one identity), its other worker forwards over the socket; counts and
    feedback are exact across both pods and the state is the same from every process.
    A 60 s Lease (renewed every 20 s): the follower shows each new state within about a
    push (0.5 s), as the answer to its push says the Lease changed."""
    api.put(NS, CM, {KEY: doc_text(lease_s=60)})
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    env = {"SPLITSERVE_KUBE_API": api.url, "SPLITSERVE_KUBE_TOKEN_FILE": str(tmp_path / "token")}
    procs = [ServerProcess(repo, "--token", TOKEN, *extra, config=f"kubernetes://{NS}/{CM}",
                           env={**env, "HOSTNAME": f"pod-{k}"}, log_path=tmp_path / f"w{k}.log")
             for k, extra in enumerate((("--workers", "2"), ()))]
    try:
        two_members_count_and_join_once(procs)
        assert api.lease(NS, LEASE)["spec"]["leaseTransitions"] == 0
    finally:
        for p in procs:
            p.stop()


def two_members_count_and_join_once(procs, wait_s: float = 10) -> None:
    """Two members (one with workers): traffic at both is counted once and shown alike by
    every process, feedback at either is matched once then duplicate, one decider."""
    for p in procs:
        p.wait_ready(240)
    assert eventually(lambda: same_on(procs, started), wait_s)
    served = [(k % 2, *infer(procs[k % 2], k)) for k in range(60)]
    assert all(code == 200 for _, code, _, _ in served)
    view = eventually(lambda: same_on(procs * 3, lambda v: total(v) == 60), wait_s)  # fresh connections
    assert view, [experiment(p) for p in procs]
    items = [{"request_id": rid, "metric": "click", "value": 1} for _, _, _, rid in served]
    got = [feedback(procs[(n // 10 + 1) % 2], items[n:n + 10]) for n in range(0, 60, 10)]
    assert sum(g["matched"] for g in got) == 60 and sum(g["unknown"] + g["duplicate"] for g in got) == 0
    again = [feedback(procs[n // 10 % 2], items[n:n + 10]) for n in range(0, 60, 10)]
    assert sum(g["duplicate"] for g in again) == 60
    holders = [line for p in procs for line in p.lines() if "event=experiment_decider lease=" in line]
    assert len(holders) == 1, holders
