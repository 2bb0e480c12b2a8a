"""Like with like, end to end: a canary with the stable version's architecture (other
weights), published while the server is under concurrent load and put in an experiment
with a tight latency guardrail (p99, max_ratio 1.2), is never rolled back for latency.

Before every version of a model shared one path, the stable version could run inline on
the loop (torch's default intra-op threads) and the canary on the executor, or the other
way round, and the slower path lost the guardrail (issue 24: 4 rollbacks in 4 runs). The
inline limit is set just above stable's quiet warm forward, as on the issue's machine,
so a canary measured under load comes out above it. One server, one fresh canary per
run, as many runs as fit in RUN_BUDGET_S."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import orjson

import make_example_models as mk
from conftest import wait_until

RUN_BUDGET_S = 55.0
LOAD_S = 5.0  # per run, after the experiment's start decision: 10 intervals
CLIENTS = 6
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                 "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]})


def routing(canary: int) -> dict:
    return {"labels": {"stable": 1, "canary": canary}, "weights": {"stable": 100},
            "experiment": {"control": "stable", "candidate": "canary", "steps": [50, 100],
                           "interval_s": 0.5, "min_requests": 1_000_000, "min_duration_s": 0,
                           "guardrails": {"errors": {"max_ratio": 1.5},
                                          "latency": {"quantile": 0.99, "max_ratio": 1.2}}}}


class Load:
    """CLIENTS threads posting predicts until stopped; counts answers by status."""

    def __init__(self, url: str):
        self.url, self.stop_at, self.codes = url, threading.Event(), {}
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def client(self):
        with httpx.Client(timeout=30) as c:
            while not self.stop_at.is_set():
                r = c.post(self.url, content=BODY, headers={"content-type": "application/json"})
                self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1

    def stop(self):
        self.stop_at.set()
        for t in self.threads:
            t.join(30)


def test_an_identical_canary_published_under_load_is_never_rolled_back_for_latency(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text('{"models": {}}')
    srv = serve(repo, cfg)
    # The limit just above stable's quiet measurement, as on the busy machine: a
    # canary measured under load comes out above it.
    quiet_s = srv.core.manager.models["mlp"].serving[1].loaded.forward_s
    srv.on_loop(lambda: setattr(srv.core.manager.settings, "inline_forward_us", quiet_s * 1.5e6))
    http = httpx.Client(base_url=srv.http, timeout=30)
    load = Load(f"{srv.http}/v2/models/mlp/infer")
    runs, rolled, figures = 0, [], []
    t_end = time.monotonic() + RUN_BUDGET_S
    try:
        while time.monotonic() < t_end or runs == 0:
            v = runs + 2
            mk.write_safetensors(tmp_path / f"v{v}", seed=v)  # same architecture, new weights
            shutil.copytree(tmp_path / f"v{v}", repo / "mlp" / f".{v}.tmp")
            (repo / "mlp" / f".{v}.tmp").rename(repo / "mlp" / str(v))
            assert wait_until(lambda: http.get(f"/v2/models/mlp/versions/{v}/ready").status_code == 200, 60)
            r = http.put("/v1/models/mlp/routing", json=routing(v))
            assert r.status_code == 200, r.text
            assert wait_until(lambda: (e := http.get("/v1/models/mlp/experiment").json())["decisions"]
                              and e["decisions"][0]["action"] == "start" and e["candidate"]["version"] == v, 30)
            until = time.monotonic() + LOAD_S
            view = {}
            while time.monotonic() < until:  # a state, not a sleep: stop early on a rollback
                view = http.get("/v1/models/mlp/experiment").json()
                if view["state"] == "rolled_back":
                    break
                time.sleep(0.1)
            runs += 1
            if view["state"] == "rolled_back":
                rolled.append(view["latch"])
            s = http.get("/v1/models/mlp/metrics").json()
            figures.append({x["version"]: (x["execution"], x["latency_ms"]["p50"], x["latency_ms"]["p99"])
                            for x in s["versions"] if x["requests"]})
    finally:
        load.stop()
    print(f"\nfair arms: {runs} runs, {len(rolled)} rolled back; per run version -> "
          f"(execution, p50 ms, p99 ms): {figures}")
    assert load.codes.get(200, 0) > 0 and set(load.codes) <= {200, 503}, load.codes
    assert runs >= 3, f"only {runs} runs fit in {RUN_BUDGET_S:g} s"
    assert not rolled, f"{len(rolled)} of {runs} runs rolled back: {rolled}"
    for f in figures:  # both arms on one path in every run, and so alike at the median
        assert len({e for e, _, _ in f.values()}) == 1, f
        p50s = [p50 for _, p50, _ in f.values()]
        assert max(p50s) <= 3 * min(p50s), f  # before: 3.91 ms against 0.33 ms in one run of 9
