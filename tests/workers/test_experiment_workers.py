"""Experiments under `splitserve serve --workers 2` (tools/serverproc.py, real clients on
fresh connections, so the kernel spreads them over both workers): exactly one worker
decides, on the traffic of both; feedback posted to whichever worker joins exactly once;
GET from either worker shows the same state; a failing canary is rolled back once; and
after kill -9 of the decider another process decides on from the persisted state."""

from __future__ import annotations

import collections
import os
import re
import signal

import grpc
import httpx
import numpy as np
import pytest

from conftest import wait_until
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pbg
from tests.e2e.test_experiment_e2e import AUTH, FLAKY, TOKEN, body, config_text
from tools.serverproc import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(make_repo):
    return make_repo({"mlp": {1: "st1", 2: "st2"}})


def start(repo, cfg, tmp_path) -> ServerProcess:
    return ServerProcess(repo, "--workers", "2", "--token", TOKEN, config=cfg,
                         log_path=tmp_path / "server.log").wait_ready(240)


def experiment(srv) -> tuple[str, dict]:
    """GET .../experiment on a fresh connection: (the worker that answered, the body)."""
    r = httpx.get(f"{srv.url}/v1/models/mlp/experiment", timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-worker"], r.json()


SHOWN = ("state", "step", "candidate_weight", "latch", "control", "candidate", "outcomes")


def same_everywhere(srv, pred, reads: int = 12):
    """Both workers answered, every answer satisfied pred and showed the same experiment
    (`judged` moves on every interval); the last view or None."""
    got = [experiment(srv) for _ in range(reads)]
    views = [v for _, v in got]
    shown = [{k: v.get(k) for k in SHOWN} for v in views]
    if {w for w, _ in got} == {"0", "1"} and all(pred(v) for v in views) and all(x == shown[0] for x in shown):
        return views[-1]
    return None


def started(v: dict) -> bool:
    """The decider's first judgment is made: requests sent from now on are counted (before
    it the view shows the first step with no decision, and that judgment judges them away)."""
    return bool(v["decisions"]) and v["candidate_weight"] == 50


def eventually(fn, timeout: float):
    """fn()'s first truthy value within timeout (a state read over HTTP), else its last."""
    box = []
    wait_until(lambda: box.append(fn()) or box[-1], timeout)
    return box[-1]


def decision_lines(srv) -> list[tuple[str, str]]:
    """(worker, action) per `event=experiment_decision` line of either worker."""
    out = []
    for line in srv.lines():
        m = re.search(r"worker=(\d+) event=experiment_decision model=mlp action=(\w+)", line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def deciders(srv) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in
            (re.search(r"event=experiment_decider worker=(\d+) pid=(\d+)", x) for x in srv.lines()) if m]


def infer_rest(srv, i: int, bad: bool = False) -> tuple[int, str | None, str | None, str]:
    r = httpx.post(f"{srv.url}/v2/models/mlp/infer", content=body(bad), timeout=30,
                   headers={"x-user-id": f"user-{i}", "content-type": "application/json"})
    return r.status_code, r.headers.get("x-model-version"), r.headers.get("x-request-id"), r.headers["x-worker"]


def infer_grpc(srv, i: int) -> tuple[str, str, str]:
    """A real gRPC ModelInfer on a fresh channel: (served version, response id, x-request-id trailer)."""
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    req = pb.ModelInferRequest(model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 64], contents=pb.InferTensorContents(fp32_contents=x.tolist()))])
    with grpc.insecure_channel(srv.grpc_target) as ch:
        resp, call = pbg.GRPCInferenceServiceStub(ch).ModelInfer.with_call(
            req, metadata=(("x-user-id", f"grpc-user-{i}"),), timeout=30)
    trailer = dict(call.trailing_metadata())
    return resp.model_version, resp.id, trailer["x-request-id"]


def post_feedback(srv, items) -> tuple[str, dict]:
    r = httpx.post(f"{srv.url}/v1/models/mlp/feedback", json={"items": items}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-worker"], r.json()


def test_one_decider_judges_both_workers_traffic_and_feedback_joins_at_any_worker(repo, tmp_path):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text(min_requests=10_000, interval_s=0.5))  # stays on step 1: 50 %
    srv = start(repo, cfg, tmp_path)
    try:
        assert wait_until(lambda: started(experiment(srv)[1]), 60)
        served = [infer_rest(srv, i) for i in range(160)]
        assert all(code == 200 for code, *_ in served), served
        assert {w for *_, w in served} == {"0", "1"}  # both workers served
        grpc_served = [infer_grpc(srv, i) for i in range(40)]
        assert all(rid and rid == trailer for _, rid, trailer in grpc_served)  # one id, two places
        by_version = collections.Counter([v for _, v, _, _ in served] + [v for v, _, _ in grpc_served])

        # Per-arm counts: every request of both workers, the same from either worker.
        view = eventually(lambda: same_everywhere(srv, lambda v: v["control"]["requests"] + v["candidate"]["requests"]
                                                  == 200), 30)
        assert view, [experiment(srv) for _ in range(4)]
        assert (view["control"]["requests"], view["candidate"]["requests"]) == (by_version["1"], by_version["2"])
        assert view["control"]["units"] + view["candidate"]["units"] == 200  # one key per request here

        # Feedback for every request (REST and gRPC ids), posted in small batches on fresh
        # connections: each lands at whichever worker, and is matched exactly once.
        items = [{"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for _, v, rid, _ in served]
        items += [{"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for v, rid, _ in grpc_served]
        answers = [post_feedback(srv, items[k:k + 10]) for k in range(0, len(items), 10)]
        assert {w for w, _ in answers} == {"0", "1"}
        assert sum(a["matched"] for _, a in answers) == 200 and sum(a["unknown"] + a["duplicate"] for _, a in answers) == 0
        again = [post_feedback(srv, items[k:k + 10]) for k in range(0, len(items), 10)]
        assert {w for w, _ in again} == {"0", "1"}
        assert sum(a["duplicate"] for _, a in again) == 200 and sum(a["matched"] + a["unknown"] for _, a in again) == 0
        _, a = post_feedback(srv, [{"request_id": "never-served", "metric": "click", "value": 1}])
        assert a == {"matched": 0, "unknown": 1, "duplicate": 0}

        def outcomes(v):
            o = v["outcomes"]
            return bool(o) and (o[0]["control"]["n"], o[0]["candidate"]["n"]) == (by_version["1"], by_version["2"])
        view = eventually(lambda: same_everywhere(srv, outcomes), 30)
        assert view, experiment(srv)
        assert by_version["2"] == 0 or view["outcomes"][0]["candidate"]["mean"] == 1.0

        # One decider: every decision logged once, all by the same worker.
        lines = decision_lines(srv)
        assert lines and len({w for w, _ in lines}) == 1, lines
        assert len(lines) == len(view["decisions"]) <= 100
        assert [a for _, a in lines] == [d["action"] for d in view["decisions"]]
        assert len(deciders(srv)) == 1
    finally:
        assert srv.stop() == 0, srv.log_text(30)


def test_a_failing_canary_is_rolled_back_once_and_a_new_decider_takes_over_after_kill_9(repo, tmp_path):
    (repo / "mlp" / "2" / "model.py").write_text(FLAKY)
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text(min_requests=10_000))
    srv = start(repo, cfg, tmp_path)
    try:
        assert wait_until(lambda: started(experiment(srv)[1]), 60)
        i = 0
        while experiment(srv)[1]["state"] != "rolled_back" and i < 3000:
            for _ in range(20):
                infer_rest(srv, i, bad=i % 2 == 0)
                i += 1
        view = eventually(lambda: same_everywhere(srv, lambda v: v["state"] == "rolled_back"), 30)
        assert view and view["latch"].startswith("errors: canary had "), experiment(srv)
        assert [a for _, a in decision_lines(srv)].count("rollback") == 1, decision_lines(srv)
        assert [d["action"] for d in view["decisions"]].count("rollback") == 1

        def routing_everywhere():  # the other workers apply the decider's write after their watcher's debounce
            got = [httpx.get(f"{srv.url}/v1/models/mlp/routing", timeout=10) for _ in range(12)]
            return {r.headers["x-worker"] for r in got} == {"0", "1"} and \
                all(r.json()["weights"] == {"stable": 100, "canary": 0} for r in got)
        assert wait_until(routing_everywhere, 10)
        assert {infer_rest(srv, 10_000 + k)[1] for k in range(20)} == {"1"}  # no routed traffic on the canary

        # kill -9 the decider: another process (the other worker or the replacement) decides on.
        (worker, pid), = deciders(srv)
        os.kill(pid, signal.SIGKILL)
        srv.wait_line(rf"event=worker_died worker={worker} signal=SIGKILL", 30)
        # (the replacement joins the port while it loads; wait until it serves)
        assert wait_until(lambda: sum(f"event=worker_serving worker={worker} " in x for x in srv.lines()) == 2, 120)
        r = httpx.post(f"{srv.url}/v1/models/mlp/experiment/retry", headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert wait_until(lambda: len(deciders(srv)) == 2, 30), srv.log_text(30)
        assert deciders(srv)[1][1] != pid
        assert wait_until(lambda: same_everywhere(srv, lambda v: v["latch"] is None and v["state"] in ("running", "holding")), 30)
        while experiment(srv)[1]["state"] != "rolled_back" and i < 6000:
            for _ in range(20):
                infer_rest(srv, i, bad=i % 2 == 0)
                i += 1
        view = eventually(lambda: same_everywhere(srv, lambda v: v["state"] == "rolled_back"), 30)
        assert view, experiment(srv)
        actions = [d["action"] for d in view["decisions"]]
        assert actions.count("rollback") == 2 and actions.count("retry") == 1, actions
        assert [a for _, a in decision_lines(srv)].count("rollback") == 2, decision_lines(srv)
    finally:
        srv.stop()


def test_sticky_counts_are_exact_per_key_after_a_worker_is_killed_9(repo, tmp_path):
    """Issue 29 item 9: every key is one unit, counted once across both workers, and a worker
    killed with -9 right after its last answer loses none of the counts it acknowledged
    (its memory-mapped tallies and its decision records are in the run folder before the
    answer leaves; the decider reads a dead incarnation's files too)."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text(min_requests=10_000, interval_s=0.5))  # stays on step 1: 50 %
    srv = start(repo, cfg, tmp_path)
    try:
        assert wait_until(lambda: started(experiment(srv)[1]), 60)
        (lead, _), = deciders(srv)
        other = "1" if lead == "0" else "0"
        pid = int(re.findall(rf"event=worker_started worker={other} pid=(\d+)", srv.log_text())[-1])
        n = 300
        served = []
        for i in range(n):  # one request per key; the second request of 60 keys goes wherever
            served.append(infer_rest(srv, i))
            if i % 5 == 0:
                served.append(infer_rest(srv, i))
        os.kill(pid, signal.SIGKILL)  # at once: a periodic snapshot would lose the last ones
        assert all(code == 200 for code, *_ in served), served
        assert collections.Counter(w for *_, w in served)[other] > 0  # the killed worker answered some
        by_version = collections.Counter(v for _, v, _, _ in served)
        srv.wait_line(rf"event=worker_died worker={other} signal=SIGKILL", 30)

        def exact(v):
            return (v["unit"] == "key" and (v["control"]["requests"], v["candidate"]["requests"])
                    == (by_version["1"], by_version["2"]) and v["control"]["units"] + v["candidate"]["units"] == n)
        view = eventually(lambda: experiment(srv)[1] if exact(experiment(srv)[1]) else None, 30)
        assert view, experiment(srv)
        # each key in the generation whose split placed it: 50 %, or the 0 % before the start
        # for a worker that applied the decider's first write late (never an SRM)
        gens = view["srm"]["generations"]
        assert sum(sum(g["units"]) for g in gens) == n and {g["share"] for g in gens} <= {0.0, 0.5}, gens
        assert all(g["units"][1] == 0 for g in gens if g["share"] == 0.0) and not view["srm"]["flagged"]

        # The killed worker's decision records survived too: every answer's feedback joins once,
        # and the outcome is analysed per key (each key one unit, in the arm it was placed in).
        items = [{"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for _, v, rid, _ in served]
        answers = [post_feedback(srv, items[k:k + 50]) for k in range(0, len(items), 50)]
        assert sum(a["matched"] for _, a in answers) == len(items), answers

        def keyed(v):  # (each key in the arm it was first placed in: intention to treat)
            o = v["outcomes"]
            return bool(o) and o[0]["unit"] == "key" and o[0]["control"]["units"] + o[0]["candidate"]["units"] == n \
                and o[0]["control"]["n"] + o[0]["candidate"]["n"] == len(items)
        view = eventually(lambda: experiment(srv)[1] if keyed(experiment(srv)[1]) else None, 30)
        assert view, experiment(srv)[1]["outcomes"]
    finally:
        srv.stop()
