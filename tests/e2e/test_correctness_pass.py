"""Issue 10 (correctness pass) on live servers: queues and queue time, overload answers,
shadows that never starve primaries, attribution of errors, TF Serving route-then-decode,
settings applied in place, TorchScript without a signature, abandoned loads, bounded
bodies, batching opt-in. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from conftest import MLP_YAML, wait_until

X = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": X.ravel().tolist()}]}

ARCH = '''
import time, torch
from torch import nn
DELAY = {delay}
RAISE = {raise_}
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)
    def forward(self, input):
        if RAISE:
            raise RuntimeError("this version is broken")
        if DELAY:
            time.sleep(DELAY)
        return self.lin(input)
def build_model():
    time.sleep({load_delay})
    return M()
'''
YAML = """inputs: [{{name: input, datatype: FP32, shape: [-1, 64]}}]
outputs: [{{name: output, datatype: FP32, shape: [-1, 8]}}]
max_batch_size: 8
version_policy: all
warmup: false
{extra}
"""


def write_model(repo: Path, name: str, versions=(1,), delay=0.0, raise_=False,
                load_delay=0.0, extra="") -> Path:
    m = repo / name
    m.mkdir(parents=True, exist_ok=True)
    (m / "model.py").write_text(ARCH.format(delay=delay, raise_=raise_, load_delay=load_delay))
    (m / "model.yaml").write_text(YAML.format(extra=extra))
    for v in versions:
        (m / str(v)).mkdir()
        torch.manual_seed(v)
        lin = torch.nn.Linear(64, 8)
        save_file({f"lin.{k}": t.contiguous() for k, t in lin.state_dict().items()},
                  str(m / str(v) / "model.safetensors"))
    return m


def prom(srv) -> dict:
    text = httpx.get(f"{srv.http}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


async def _burst(url: str, n: int, body=BODY, headers=None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as c:
        return await asyncio.gather(*(c.post(url, json=body, headers=headers) for _ in range(n)))


def burst(url, n, **kw):
    return asyncio.run(_burst(url, n, **kw))


def test_unbatched_queue_is_bounded_timed_and_answers_429(make_repo, serve):
    repo = make_repo({})
    write_model(repo, "slow", delay=0.3, extra="max_queue_size: 2")
    srv = serve(repo)
    assert srv.available("slow") == [1]
    rs = burst(f"{srv.http}/v2/models/slow/infer", 6)
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 3 and codes.count(429) == 3, codes  # 1 running + 2 waiting
    refused = next(r for r in rs if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-model-version"] == "1"
    assert "max_queue_size" in refused.json()["error"]
    # the second admitted request waited for the first: queue time is measured and reported
    st = httpx.get(f"{srv.http}/v2/models/slow/versions/1/stats").json()["model_stats"][0]
    assert st["inference_stats"]["queue"]["count"] == 3
    assert st["inference_stats"]["queue"]["ns"] > 0.8e9  # waited 0.3 s and 0.6 s
    q = prom(srv)["splitserve_queue_duration_seconds"]
    total = [s.value for s in q.samples if s.name.endswith("_sum")][0]
    assert total > 0.2


def test_shadows_never_refuse_the_targets_own_requests(make_repo, serve, tmp_path):
    repo = make_repo({})
    write_model(repo, "m", versions=(1, 2), delay=0.15, extra="max_queue_size: 1")
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("models:\n  m:\n    labels: {stable: 1, canary: 2}\n"
                   "    weights: {stable: 100}\n    shadow: {target: canary, percent: 100}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("m") == [1, 2]

    async def both():
        async with httpx.AsyncClient(timeout=30) as c:
            split = [c.post(f"{srv.http}/v2/models/m/infer", json=BODY) for _ in range(2)]
            pinned = [c.post(f"{srv.http}/v2/models/m/versions/2/infer", json=BODY)
                      for _ in range(2)]
            return await asyncio.gather(*split, *pinned)
    for _ in range(3):  # shadows of earlier rounds are still waiting when the next arrives
        rs = asyncio.run(both())
        assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
        assert [r.headers["x-model-version"] for r in rs[2:]] == ["2", "2"]
    summary = httpx.get(f"{srv.http}/v1/models/m/metrics").json()
    row = {v["version"]: v for v in summary["versions"]}["2"]
    assert row["errors"] == 0


def test_dropped_and_failed_shadows_are_counted_with_their_code(make_repo, serve, tmp_path):
    repo = make_repo({})
    write_model(repo, "m", versions=(1,))
    write_model(repo, "m", versions=(2,), delay=0.6)  # same folder: v2 shares model.py
    (repo / "m" / "model.py").write_text(ARCH.format(delay=0.0, raise_=False, load_delay=0.0))
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("models:\n  m:\n    labels: {stable: 1, canary: 2}\n"
                   "    weights: {stable: 100}\n    shadow: {target: canary, percent: 100}\n")
    srv = serve(repo, config=cfg, request_timeout_s=5)
    assert srv.available("m") == [1, 2]
    srv.on_loop(lambda: setattr(srv.core.inference, "shadow_max_inflight", 1))
    rs = burst(f"{srv.http}/v2/models/m/infer", 6)
    assert all(r.status_code == 200 for r in rs)
    assert srv.wait_for(lambda: srv.core.inference.shadow_inflight == 0, 10)
    fams = prom(srv)
    dropped = {s.labels["version"]: s.value for s in fams["splitserve_shadow_dropped"].samples
               if s.name.endswith("_total")}
    assert dropped.get("2", 0) >= 1, dropped


def test_a_version_that_raises_says_which_version_it_was(make_repo, serve):
    repo = make_repo({})
    write_model(repo, "bad", raise_=True)
    srv = serve(repo)
    r = httpx.post(f"{srv.http}/v2/models/bad/infer", json=BODY)
    assert r.status_code == 500 and "this version is broken" in r.json()["error"]
    assert r.headers["x-model-version"] == "1" and r.headers["x-request-id"]


def test_client_mistakes_are_not_charged_to_versions(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                       "data": [1.0, 2.0, 3.0]}]}
    for _ in range(20):
        r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=bad)
        assert r.status_code == 400
    assert httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY).status_code == 200
    s = httpx.get(f"{srv.http}/v1/models/mlp/metrics").json()
    row = s["versions"][0]
    assert (row["requests"], row["errors"], row["error_rate"]) == (1, 0, 0.0)
    assert s["client_errors"] == 20
    st = httpx.get(f"{srv.http}/v2/models/mlp/versions/1/stats").json()["model_stats"][0]
    assert st["inference_stats"]["fail"]["count"] == 0


def _export(path: Path, arg: str, seed: int) -> None:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 8)
    ns: dict = {}
    exec(f"def forward(self, {arg}):\n    return self.lin({arg})\n", ns)
    cls = type("M", (torch.nn.Module,), {"forward": ns["forward"]})
    m = cls()
    m.lin = lin
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m.eval(), (torch.zeros(2, 64),), dynamic_shapes=({0: batch},))
    path.mkdir(parents=True)
    torch.export.save(ep, str(path / "model.pt2"))


def test_tf_serving_decodes_against_the_version_it_routed_to(tmp_path, serve):
    repo = tmp_path / "repo"
    _export(repo / "m" / "1", "input", 1)
    _export(repo / "m" / "2", "features", 2)  # the canary renamed its input
    (repo / "m" / "model.yaml").write_text("version_policy: all\n")
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("models:\n  m:\n    labels: {stable: 1, canary: 2}\n"
                   "    weights: {stable: 100, canary: 0}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("m") == [1, 2]
    for _ in range(5):  # unpinned: routed to stable, typed by stable's signature
        r = httpx.post(f"{srv.http}/v1/models/m:predict", json={"inputs": {"input": X.tolist()}})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "1"
    r = httpx.post(f"{srv.http}/v1/models/m/labels/canary:predict",
                   json={"inputs": {"features": X.tolist()}})
    assert r.status_code == 200 and r.headers["x-model-version"] == "2", r.text


def test_settings_edit_applies_in_place_without_reloading(make_repo, serve):
    yaml = MLP_YAML.replace("batching:\n  enabled: false", "batching:\n  enabled: true")
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": yaml})
    srv = serve(repo)
    gen = srv.on_loop(lambda: srv.core.manager.models["mlp"].serving[1].generation)
    before = srv.on_loop(lambda: srv.core.manager.reconciles["mlp"])
    p = repo / "mlp" / "model.yaml"
    p.write_text(p.read_text().replace("max_queue_delay_us: 500", "max_queue_delay_us: 7000"))
    assert srv.wait_for(lambda: srv.core.manager.reconciles["mlp"] > before
                        and srv.core.manager._quiet("mlp"), 30)
    h = srv.on_loop(lambda: srv.core.manager.models["mlp"].serving[1])
    assert h.generation == gen  # the same loaded weights: no reload
    assert h.runner.batcher.delay == pytest.approx(0.007)
    cfg = httpx.get(f"{srv.http}/v2/models/mlp/config").json()
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 7000


def test_max_batch_size_alone_does_not_turn_batching_on(make_repo, serve):
    import re
    yaml = re.sub(r"\n  enabled: false[^\n]*", "", MLP_YAML)
    assert "enabled" not in yaml and "batching:" in yaml
    srv = serve(make_repo({"mlp": {1: "st1"}}, yaml={"mlp": yaml}))
    h = srv.on_loop(lambda: srv.core.manager.models["mlp"].serving[1])
    assert h.runner.batcher is None and h.batch_calibration == {}
    assert "dynamic_batching" not in httpx.get(f"{srv.http}/v2/models/mlp/config").json()


def test_torchscript_without_model_yaml_serves(tmp_path, serve, version_cache, caplog):
    import shutil
    repo = tmp_path / "repo"
    (repo / "ts").mkdir(parents=True)
    shutil.copytree(version_cache / "ts4", repo / "ts" / "1")
    with caplog.at_level("WARNING", logger="splitserve.loader"):
        srv = serve(repo)
    assert srv.available("ts") == [1]
    assert any("warmup_skipped" in r.getMessage() and "declare inputs" in r.getMessage()
               for r in caplog.records)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                        "data": X.ravel().tolist()}]}
    meta = httpx.get(f"{srv.http}/v2/models/ts").json()
    body["inputs"][0]["name"] = meta["inputs"][0]["name"]
    r = httpx.post(f"{srv.http}/v2/models/ts/infer", json=body)
    assert r.status_code == 200, r.text


def test_a_timed_out_load_is_accounted_until_its_thread_ends(make_repo, serve):
    repo = make_repo({})
    write_model(repo, "hang", load_delay=8.0, extra="load_timeout_s: 0.3")
    srv = serve(repo)
    st = httpx.get(f"{srv.http}/v1/models/hang").json()["model_version_status"][0]
    assert "load_timeout_s=0.3s" in st["status"]["error_message"]
    assert "holds memory" in st["status"]["error_message"]
    g = prom(srv)["splitserve_abandoned_loads"].samples[0].value
    assert g == 1
    assert srv.wait_for(lambda: srv.core.manager.view().abandoned_loads == 0, 30)
    assert prom(srv)["splitserve_abandoned_loads"].samples[0].value == 0


def test_repository_index_body_is_bounded(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    r = httpx.post(f"{srv.http}/v2/repository/index", content=b" " * (200 * 1024))
    assert r.status_code == 413
    r = httpx.post(f"{srv.http}/v2/repository/index", content=b"{")
    assert r.status_code == 400 and "ready" in r.json()["error"]
    assert httpx.post(f"{srv.http}/v2/repository/index", json={"ready": True}).status_code == 200


def test_once_stopping_every_response_closes_its_connection(make_repo, serve):
    """Issue 11: idle keep-alive connections must not be cut without notice on SIGTERM."""
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    with httpx.Client(base_url=srv.http, timeout=10) as c:
        r = c.post("/v2/models/mlp/infer", json=BODY)
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        srv.on_loop(lambda: setattr(srv.core, "stopping", True))
        r = c.post("/v2/models/mlp/infer", json=BODY)  # still served during shutdown_delay_s
        assert r.status_code == 200 and r.headers["connection"] == "close"
        assert c.get("/v2/health/ready").status_code == 503
