"""deploy/grafana/splitserve.json: importable as it is (one datasource input, unique panel
ids, a grid without overlaps) and every query names a metric a live server exports, with
legend labels that metric carries. The server is driven so that every family has samples:
split traffic, a shadow copy, a version that fails to load, and an experiment that takes
feedback and is rolled back (tests/e2e/test_experiment_e2e.py's helpers drive it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from e2e.test_experiment_e2e import AUTH, TOKEN, send
from runtime.types import VersionState

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "splitserve.json"
METRIC_RE = re.compile(r"\b(splitserve_[a-z0-9_]+)\b")
LEGEND_RE = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
CONFIG = """models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 90, canary: 10}
    sticky: {header: x-user-id}
    shadow: {target: canary, percent: 100}
    experiment:
      control: stable
      candidate: canary
      steps: [10, 100]
      interval_s: 0.3
      min_requests: 100000
      min_duration_s: 0
      guardrails: {errors: {max_ratio: 1.5}, latency: {quantile: 0.99, max_ratio: 2.0}}
      outcomes: [{metric: click, kind: binary, goal: increase}]
"""
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(d: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) for every target and the template variable queries."""
    out = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        out.append((f"variable {v['name']}", q, ""))
    return out


def test_dashboard_is_importable_as_it_is():
    d = dashboard()
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
    for title, expr, _ in queries(d):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        assert METRIC_RE.search(expr), f"{title}: the query names no splitserve metric"


def test_every_query_names_an_exported_metric(make_repo, serve, tmp_path):
    import torch
    from safetensors.torch import save_file

    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    (repo / "mlp" / "3").mkdir()
    save_file({"bogus": torch.zeros(2)}, str(repo / "mlp" / "3" / "model.safetensors"))
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg, token=TOKEN)
    assert srv.wait_state("mlp", 3, VersionState.FAILED)
    assert srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    with httpx.Client(base_url=srv.http, timeout=30) as http:
        assert wait_until(lambda: http.get("/v1/models/mlp/experiment").json()["state"] == "running", 30)
        served = send(http, srv, 30)
        assert all(code == 200 for code, _, _ in served)
        items = [{"request_id": rid, "metric": "click", "value": 1} for _, _, rid in served]
        assert http.post("/v1/models/mlp/feedback", json={"items": items}, headers=AUTH).status_code == 200
        assert http.post("/v1/models/mlp/experiment/rollback", headers=AUTH).status_code == 200
        bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.5] * 3}]}
        assert http.post("/v2/models/mlp/infer", json=bad).status_code == 400  # a non-OK code
        # Shadow copies are compared after the primary answers: wait until they are counted.
        assert wait_until(lambda: "splitserve_shadow_agreement_ratio" in _scrape(http), timeout=30)
        exported = _scrape(http)

    cuda = torch.cuda.is_available()
    source = "".join(p.read_text() for p in (ROOT / "runtime").rglob("*.py"))
    checked = 0
    for title, expr, legend in queries(dashboard()):
        names = set(METRIC_RE.findall(expr))
        for name in names:
            if (name.startswith("splitserve_cuda_") and not cuda) or name.startswith("splitserve_store_"):
                # Exported only where a CUDA device is visible, or by an object-storage
                # repository's mirror (tests/objectstore scrapes those): check the family exists.
                family = name.removesuffix("_total")
                assert f'"{family}"' in source, f"{title}: {name} is not a metric family in runtime/"
                continue
            assert name in exported, f"{title}: {name} is not exported (exported: {sorted(exported)})"
            checked += 1
        carried = set().union(*(exported.get(n, set()) for n in names)) - {"le"}
        for label in LEGEND_RE.findall(legend):
            if any(n.startswith("splitserve_cuda_") for n in names) and not cuda:
                continue
            if any(n.startswith("splitserve_store_") for n in names):
                assert label == "instance" or label in ("op", "result"), f"{title}: legend label {label!r}"
                continue
            assert label in carried, f"{title}: legend label {label!r} is not on {sorted(names)}"
    assert checked >= 25
    on_board = {n for _, expr, _ in queries(dashboard()) for n in METRIC_RE.findall(expr)}
    experiment = {n for n in exported if n.startswith("splitserve_experiment_")}
    assert len(experiment) >= 8 and experiment <= on_board, sorted(experiment - on_board)


def _scrape(http) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from the live /metrics text."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out
