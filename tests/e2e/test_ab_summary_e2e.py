"""The A/B summary as a comparison on a live server: its window (since the last routing
change by default, since start, since an epoch; a bad value is one 400 line), the config's
units and 4-digit shares, and the experiment block beside the Prometheus experiment series
(state, step, candidate weight, guardrail evidence, SRM p-value, rollbacks by reason,
feedback by result). Experiments are driven with tests/e2e/test_experiment_e2e.py's helpers."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from test_experiment_e2e import AUTH, TOKEN, config_text, experiment, send

ROUTING = {"labels": {"stable": 1, "canary": 2}, "sticky": {"header": "x-user-id"}}


def summary(srv, **params) -> httpx.Response:
    return httpx.get(f"{srv.http}/v1/models/mlp/metrics", params=params, timeout=10)


def requests_in(doc) -> int:
    return sum(v["requests"] for v in doc["versions"] + doc["ended"])


def test_the_window_starts_at_the_last_routing_change(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(json.dumps({"models": {"mlp": {**ROUTING, "weights": {"stable": 100}}}}))
    started = time.time()
    srv = serve(repo, cfg, token=TOKEN)
    with httpx.Client(timeout=30) as c:
        assert {v for _, v, _ in send(c, srv, 30)} == {"1"}
        at_start = summary(srv).json()["window"]  # the document read at start is no change
        assert at_start["from_event"] == "process_start" and at_start["from"] >= started
        changed = time.time()
        r = c.put(f"{srv.http}/v1/models/mlp/routing", headers=AUTH,
                  json={**ROUTING, "weights": {"stable": 90, "canary": 10}})
        assert r.status_code == 200, r.text
        served = send(c, srv, 200, start=1000)
    doc = summary(srv).json()  # the default: since=routing
    assert doc["window"]["since"] == "routing" and doc["window"]["from_event"] == "routing_change"
    assert changed <= doc["window"]["from"] <= time.time() and doc["window"]["seconds"] >= 0
    assert requests_in(doc) == 200  # the 30 before the change are not in it
    rows = {v["version"]: v for v in doc["versions"]}
    assert sum(1 for _, v, _ in served if v == "2") == rows["2"]["requests"] > 0
    assert (rows["1"]["weight"], rows["2"]["weight"]) == (90, 10)  # the config's units
    assert (rows["1"]["configured_share"], rows["1"]["labels"], rows["1"]["label"]) == (0.9, ["stable"], ["stable"])
    share = rows["2"]["observed_share"]
    assert share == round(rows["2"]["routed_requests"] / 200, 4) and len(repr(share)) <= 6
    assert requests_in(summary(srv, since="start").json()) == 230
    before = summary(srv, since=str(int(started) - 60)).json()
    assert before["window"]["from_event"] == "process_start" and requests_in(before) == 230
    for bad in ("soon", "-1", str(int(time.time()) + 3600)):
        r = summary(srv, since=bad)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert "\n" not in msg and "'routing', 'start' or a unix time in seconds" in msg, msg


def _scrape(srv) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{srv.http}/metrics", timeout=10).text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(samples, name, **labels) -> float:
    got = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, samples.get(name))
    return got[0]


def test_the_summary_carries_the_experiment_and_prometheus_its_series(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(config_text(min_requests=10_000))  # stays on its first step
    srv = serve(repo, cfg, token=TOKEN)
    assert wait_until(lambda: experiment(srv)["decisions"][:1] and experiment(srv)["candidate_weight"] == 50, 30)
    with httpx.Client(timeout=30) as c:
        served = send(c, srv, 40)
        items = [{"request_id": rid, "metric": "click", "value": 1} for code, _, rid in served if code == 200]
        extra = [items[0], {"request_id": "nope", "metric": "click", "value": 0}]
        for body in ({"items": items}, {"items": extra}):
            assert c.post(f"{srv.http}/v1/models/mlp/feedback", json=body, headers=AUTH).status_code == 200
        samples = _scrape(srv)
        lit = [lab["state"] for lab, v in samples["splitserve_experiment_state"] if v == 1]
        assert lit in (["running"], ["holding"]), lit  # holding: an interval passed without traffic
        assert one(samples, "splitserve_experiment_state", model="mlp", state="rolled_back") == 0
        assert one(samples, "splitserve_experiment_step", model="mlp") == 1
        assert one(samples, "splitserve_experiment_candidate_weight", model="mlp") == 50
        assert one(samples, "splitserve_experiment_guardrail_evidence", model="mlp", guardrail="errors") >= 0
        assert 0 <= one(samples, "splitserve_experiment_srm_p_value", model="mlp") <= 1
        for result, n in (("matched", len(items)), ("unknown", 1), ("duplicate", 1)):
            assert one(samples, "splitserve_experiment_feedback_total", model="mlp", result=result) == n
        r = c.post(f"{srv.http}/v1/models/mlp/experiment/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["state"] == "rolled_back"
    samples = _scrape(srv)
    assert one(samples, "splitserve_experiment_state", model="mlp", state="rolled_back") == 1
    assert one(samples, "splitserve_experiment_candidate_weight", model="mlp") == 0
    assert one(samples, "splitserve_experiment_rollbacks_total", model="mlp", reason="manual") == 1
    block, view = summary(srv).json()["experiment"], experiment(srv)
    assert block["state"] == view["state"] == "rolled_back"
    assert block["decisions"] == view["decisions"] and block["decisions"][-1]["action"] == "rollback"
    assert block.keys() == view.keys() and "guardrails" in block and "srm" in block
