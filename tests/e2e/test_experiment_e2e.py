"""Experiments on a live server over real HTTP: a canary whose model.py raises on a share
of inputs is rolled back with its reason and then gets no routed traffic; a healthy one
walks every step and is promoted; feedback lands on the version that served; no traffic
holds; state and latches survive a restart. Every wait is on a state read over HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np
import orjson
import pytest

from conftest import wait_until

TOKEN = "exp-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FLAKY = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=256, depth=2, d_out=8):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, input):
        if bool((input[:, 0] > 100).any()):
            raise ValueError("flaky canary: cannot handle this input")
        return self.net(input)


def build_model(**kwargs):
    return MLP(**kwargs)
'''


def body(bad: bool) -> bytes:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    if bad:
        x[0] = 1000.0
    return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.tolist()}]})


def config_text(**exp) -> str:
    block = {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 0.3,
             "min_requests": 20, "min_duration_s": 0, "guardrails": {"errors": {"max_ratio": 1.5}},
             "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}
    block.update(exp)
    doc = {"models": {"mlp": {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100},
                              "sticky": {"header": "x-user-id"}, "experiment": block}}}
    return json.dumps(doc)  # JSON is YAML


@pytest.fixture
def repo(make_repo):
    root = make_repo({"mlp": {1: "st1", 2: "st2"}})
    return root


def experiment(srv) -> dict:
    r = httpx.get(f"{srv.http}/v1/models/mlp/experiment", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def send(client, srv, n, start=0, bad_every=0):
    served = []
    for i in range(start, start + n):
        r = client.post(f"{srv.http}/v2/models/mlp/infer", content=body(bool(bad_every) and i % bad_every == 0),
                        headers={"x-user-id": f"user-{i}", "content-type": "application/json"})
        served.append((r.status_code, r.headers.get("x-model-version"), r.headers.get("x-request-id")))
    return served


def test_a_failing_canary_is_rolled_back_and_the_latch_survives_a_restart(repo, tmp_path, serve):
    (repo / "mlp" / "2" / "model.py").write_text(FLAKY)
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text(min_requests=10_000))
    srv = serve(repo, cfg, token=TOKEN)
    assert wait_until(lambda: experiment(srv)["decisions"][:1] and experiment(srv)["candidate_weight"] == 50, 30)
    with httpx.Client(timeout=30) as c:
        i = 0
        while experiment(srv)["state"] != "rolled_back" and i < 4000:
            send(c, srv, 20, start=i, bad_every=2)
            i += 20
        view = experiment(srv)
        assert view["state"] == "rolled_back", view
        assert view["latch"].startswith("errors: canary had ") and ">= 40 (alpha 0.05 shared by 2 tests)" in view["latch"]
        assert view["decisions"][-1]["action"] == "rollback"
        routing = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10).json()
        assert routing["weights"] == {"stable": 100, "canary": 0} and routing["experiment"]["control"] == "stable"
        after = send(c, srv, 40, start=10_000)
        assert {v for _, v, _ in after} == {"1"}  # no routed traffic reaches the canary
    state_file = tmp_path / "splitserve.experiments.json"
    assert json.loads(state_file.read_text())["models"]["mlp"]["phase"] == "rolled_back"
    srv.stop()
    again = serve(repo, cfg, token=TOKEN)
    view = experiment(again)
    assert view["state"] == "rolled_back" and view["latch"].startswith("errors: canary had ")
    r = httpx.post(f"{again.http}/v1/models/mlp/experiment/retry", timeout=10)
    assert r.status_code == 401
    r = httpx.post(f"{again.http}/v1/models/mlp/experiment/resume", headers=AUTH, timeout=10)
    assert r.status_code == 409 and "retry first" in r.json()["error"]
    r = httpx.post(f"{again.http}/v1/models/mlp/experiment/retry", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["candidate_weight"] == 50
    assert httpx.post(f"{again.http}/v1/models/mlp/experiment/stop", headers=AUTH, timeout=10).status_code == 404


def test_a_healthy_canary_is_promoted_and_feedback_lands_on_the_served_version(repo, tmp_path, serve):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text())
    srv = serve(repo, cfg, token=TOKEN)
    assert wait_until(lambda: experiment(srv)["decisions"][:1] and experiment(srv)["candidate_weight"] == 50, 30)
    with httpx.Client(timeout=30) as c:
        served = send(c, srv, 30)
        items = [{"request_id": rid, "metric": "click", "value": 1 if v == "2" else 0} for code, v, rid in served
                 if code == 200]
        r = c.post(f"{srv.http}/v1/models/mlp/feedback", json={"items": items}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {"matched": len(items), "unknown": 0, "duplicate": 0}
        r = c.post(f"{srv.http}/v1/models/mlp/feedback", headers=AUTH,
                   json={"items": [items[0], {"request_id": "nope", "metric": "click", "value": 1}]})
        assert r.json() == {"matched": 0, "unknown": 1, "duplicate": 1}
        r = c.post(f"{srv.http}/v1/models/mlp/feedback", headers=AUTH,
                   json={"items": [{"request_id": "x", "metric": "buy", "value": 1}]})
        assert r.status_code == 400 and "items[0].metric: 'buy' is not an outcome" in r.json()["error"]
        assert c.post(f"{srv.http}/v1/models/mlp/feedback", json={"items": items}).status_code == 401
        on_candidate = sum(1 for code, v, _ in served if code == 200 and v == "2")

        def outcome_counts():  # feedback is folded into the state at the next interval
            outcomes = experiment(srv)["outcomes"]
            if not outcomes:
                return None, None, None
            o = outcomes[0]
            return o["control"]["n"], o["candidate"]["n"], o["candidate"]["mean"]

        assert wait_until(lambda: outcome_counts()[:2] == (len(items) - on_candidate, on_candidate), 30)
        assert on_candidate == 0 or outcome_counts()[2] == 1.0  # clicks of 1 were the canary's
        i = 30
        while experiment(srv)["state"] != "promoted" and i < 6000:
            send(c, srv, 20, start=i)
            i += 20
    view = experiment(srv)
    assert view["state"] == "promoted", view
    moves = [d["action"] for d in view["decisions"] if d["action"] not in ("hold", "run")]  # quiet spells aside
    assert moves == ["start", "advance", "promote"]
    routing = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10).json()
    assert routing["labels"]["stable"] == 2 and routing["experiment"] is None
    assert "experiment" not in cfg.read_text()


def test_no_traffic_holds_and_a_person_can_pause(repo, tmp_path, serve):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text())
    srv = serve(repo, cfg, token=TOKEN)
    assert wait_until(lambda: experiment(srv)["state"] == "holding", 30)
    view = experiment(srv)
    assert view["step"] == 1 and view["decisions"][-1]["action"] == "hold"
    assert "no requests on stable and canary" in view["decisions"][-1]["reason"]
    r = httpx.post(f"{srv.http}/v1/models/mlp/experiment/pause", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert httpx.get(f"{srv.http}/v1/models/nope/experiment", timeout=10).status_code == 404
