"""One experiment decider across three `splitserve serve` processes sharing one writable
config FILE (tools/serverproc.py, each its own port, as test_k8s_fleet.py runs them behind
HAProxy): exactly one takes the flock beside the file and judges all three's traffic;
feedback at a non-decider for a request another served is matched once; after kill -9 of
the decider another takes the lock at once and carries on exactly (counts neither lost nor
twice); a failing canary is rolled back once; after kill -9 of that decider the last one
takes over with the latch intact (no second rollback); every server shows the same
experiment throughout, and the state is the file a lone server keeps."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import wait_until
from tests.e2e.test_experiment_e2e import AUTH, FLAKY, TOKEN
from tests.k8s.test_k8s_experiment_fleet import (deciders, doc_text, eventually, experiment, fail_canary_until_rolled_back,
                                                 feedback, infer, rollbacks, same_on, started, total,
                                                 traffic_judged_as_the_sum, two_members_count_and_join_once)
from tools.serverproc import ServerProcess

pytestmark = pytest.mark.slow


def test_one_decider_across_three_servers_sharing_one_config_file(make_repo, tmp_path):
    t0 = time.monotonic()
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    (repo / "mlp" / "2" / "model.py").write_text(FLAKY)
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(doc_text())
    procs = [ServerProcess(repo, "--token", TOKEN, config=cfg, env={"HOSTNAME": f"srv-{k}"},
                           log_path=tmp_path / f"s{k}.log") for k in range(3)]
    try:
        for p in procs:
            p.wait_ready(240)
        assert eventually(lambda: same_on(procs, lambda v: v["state"] in ("running", "holding")
                                          and started(v)), 30), [experiment(p) for p in procs]
        assert len(deciders(procs)) == 1, [p.log_text(20) for p in procs]
        (lead,) = deciders(procs)
        record = json.loads((tmp_path / ".splitserve.yaml.decider.json").read_text())
        assert record["holder"].startswith(f"srv-{lead}-")
        assert record["annotations"]["splitserve.io/decider-url"] == procs[lead].url
        f0, f1 = [k for k in range(3) if k != lead]

        # Traffic at every server: judged once, by the decider, as the sum of all three.
        served, by_version, view = traffic_judged_as_the_sum(procs, 90)

        # Feedback at a non-decider for requests another non-decider served: matched once.
        click = {rid: {"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for _, _, v, rid in served}
        items = [click[rid] for n, (at, _, _, rid) in enumerate(served) if at == f1 and n % 2]
        later = [click[rid] for n, (at, _, _, rid) in enumerate(served) if at == f0 and n % 2]
        assert feedback(procs[f0], items) == {"matched": len(items), "unknown": 0, "duplicate": 0}
        assert feedback(procs[f1], items) == {"matched": 0, "unknown": 0, "duplicate": len(items)}

        # kill -9 the decider: the kernel frees the lock, a survivor takes it at its next sync.
        killed_at = time.monotonic()
        procs[lead].kill()
        survivors = [procs[f0], procs[f1]]
        assert wait_until(lambda: len(deciders(procs)) == 2, 30), [p.log_text(20) for p in survivors]
        took = time.monotonic() - killed_at
        (lead2,) = [k for k in deciders(procs) if k != lead]
        more = [infer(survivors[k % 2], 20_000 + k) for k in range(40)]
        assert all(code == 200 for code, _, _ in more)
        by_version.update(v for _, v, _ in more)
        view = eventually(lambda: same_on(survivors, lambda v: total(v) == 130), 30)
        assert view, [experiment(p) for p in survivors]
        assert (view["control"]["requests"], view["candidate"]["requests"]) == (by_version["1"], by_version["2"])
        other = f1 if lead2 == f0 else f0  # records served before the change reach the new decider
        assert feedback(procs[other], later) == {"matched": len(later), "unknown": 0, "duplicate": 0}

        # A failing canary: rolled back once, shown alike, kept in the lone server's state file.
        view = fail_canary_until_rolled_back(survivors)
        assert rollbacks(procs) == 1
        kept = json.loads((tmp_path / "splitserve.experiments.json").read_text())
        assert kept["models"]["mlp"]["latch"] == view["latch"]

        # kill -9 that decider too: the last server decides, the latch intact, no second rollback.
        procs[lead2].kill()
        last = procs[other]
        assert wait_until(lambda: len(deciders(procs)) == 3, 30), last.log_text(20)
        assert {infer(last, 9000 + k)[1] for k in range(12)} == {"1"}  # no routed traffic on the canary
        shown = eventually(lambda: same_on([last], lambda v: v["state"] == "rolled_back"), 10)
        assert shown["latch"] == view["latch"] and shown["decisions"] == view["decisions"]
        r = httpx.post(f"{last.url}/v1/models/mlp/experiment/retry", headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert rollbacks(procs) == 1
        print(f"\nfile fleet: takeover after kill -9 in {took:.2f}s; whole test {time.monotonic() - t0:.0f}s")
    finally:
        for p in procs:
            p.stop()


def test_a_server_with_workers_is_one_member_sharing_the_file(make_repo, tmp_path):
    """`--workers 2` in one server, one worker in the other: the server's local decider
    (its run folder's flock holder) takes part for it; counts and feedback are exact across
    both and every process shows the same state, read from the one state file."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(doc_text())
    procs = [ServerProcess(repo, "--token", TOKEN, *extra, config=cfg, env={"HOSTNAME": f"srv-{k}"},
                           log_path=tmp_path / f"w{k}.log") for k, extra in enumerate((("--workers", "2"), ()))]
    try:
        two_members_count_and_join_once(procs, wait_s=30)
    finally:
        for p in procs:
            p.stop()
