"""Scenario 6: memory over many hot swaps.

100 cycles of: version 2 dropped in (publish by rename), AVAILABLE and serving, its
folder deleted, version 1 serving again; one client thread keeps a light load on the
whole time (and must see no failure). Process RSS after a warm-up grows by less than
RSS_BOUND. On CUDA, `torch.cuda.memory_allocated` returns to its pre-load value after
each unload.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time

import httpx
import pytest
import torch

from reliability_helpers import BODY, MLP_YAML, rss_bytes, wait_until

pytestmark = pytest.mark.slow
RSS_BOUND = 20 * 1024 * 1024
WARMUP_CYCLES = 10
CYCLES = 100


def _cycle(srv, m, version_cache, i: int) -> None:
    shutil.copytree(version_cache / "st2", m / ".2.tmp")
    os.rename(m / ".2.tmp", m / "2")
    assert srv.wait_for(lambda: srv.available("mlp") == [2], 30), f"cycle {i}: v2 never served"
    shutil.rmtree(m / "2")
    assert srv.wait_for(lambda: srv.available("mlp") == [1], 30), f"cycle {i}: v1 never back"


def test_rss_bounded_over_100_hot_swaps(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_YAML})
    srv = serve(repo, quiet_s=0.05)
    m = repo / "mlp"
    stop = threading.Event()
    sent, failures, versions = [0], [], set()

    def client():
        with httpx.Client(base_url=srv.http, timeout=30) as c:
            while not stop.is_set():
                sent[0] += 1
                try:
                    r = c.post("/v2/models/mlp/infer", json=BODY)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        versions.add(r.json()["model_version"])
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                time.sleep(0.02)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        for i in range(WARMUP_CYCLES):
            _cycle(srv, m, version_cache, i)
        gc.collect()
        before = rss_bytes()
        trend = []
        for i in range(CYCLES):
            _cycle(srv, m, version_cache, i)
            if (i + 1) % 25 == 0:
                gc.collect()
                trend.append((rss_bytes() - before) / 1e6)
        gc.collect()
        grown = rss_bytes() - before
    finally:
        stop.set()
        t.join(30)
    took = time.monotonic() - t0
    print(f"\n  memory: {WARMUP_CYCLES}+{CYCLES} hot-swap cycles in {took:.1f}s under light load "
          f"({sent[0]} requests, {len(failures)} failed, versions seen {sorted(versions)}); "
          f"RSS {before / 1e6:.1f} MB -> {(before + grown) / 1e6:.1f} MB, delta {grown / 1e6:+.1f} MB "
          f"(bound {RSS_BOUND / 1e6:.0f} MB); delta every 25 cycles: {trend}")
    assert not failures, failures[:5]
    assert versions == {"1", "2"}
    assert grown < RSS_BOUND, f"RSS grew by {grown / 1e6:.1f} MB over {CYCLES} hot-swap cycles"
    entry = srv.core.manager.models["mlp"]
    # nothing left behind: v2's harness goes once its unload finishes (v1 serves before that)
    assert wait_until(lambda: [h.version for h in entry.harnesses] == [1], 30), \
        [h.version for h in entry.harnesses]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_back_after_each_unload(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_YAML.replace("device: auto", "device: cuda")})
    srv = serve(repo, quiet_s=0.05)
    m = repo / "mlp"
    assert srv.core.manager.models["mlp"].serving[1].loaded.device.type == "cuda"
    assert httpx.post(srv.http + "/v2/models/mlp/infer", json=BODY, timeout=30).status_code == 200
    held, below, back = [], [], 0  # held: (bytes version 2 allocated at load, net swap delta)

    def v1_request():
        r = httpx.post(srv.http + "/v2/models/mlp/versions/1/infer", json=BODY, timeout=30)
        assert r.status_code == 200, r.text

    for i in range(20):
        gc.collect()  # garbage of earlier tests must not be freed mid-cycle
        v1_request()  # version 1's cuBLAS workspace exists before the cycle ...
        torch.cuda.synchronize()
        pre = torch.cuda.memory_allocated()
        shutil.copytree(version_cache / "st2", m / ".2.tmp")
        os.rename(m / ".2.tmp", m / "2")
        assert srv.wait_for(lambda: srv.available("mlp") == [2], 30)
        r = httpx.post(srv.http + "/v2/models/mlp/infer", json=BODY, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == "2"
        lm = srv.core.manager.models["mlp"].serving[2].loaded
        assert lm.device.type == "cuda" and lm.memory_bytes > 0
        torch.cuda.synchronize()
        # latest: 1, so version 2 replaced version 1: the net change is what the swap cost
        held.append((lm.memory_bytes, torch.cuda.memory_allocated() - pre))
        shutil.rmtree(m / "2")
        assert srv.wait_for(lambda: srv.available("mlp") == [1], 30)
        # nothing of version 2 left: at or below the pre-load value (the unload clears every
        # cuBLAS workspace, version 1's too, which comes back on its next matmul) ...
        assert wait_until(lambda: torch.cuda.memory_allocated() <= pre, 10), (
            f"cycle {i}: {torch.cuda.memory_allocated() - pre} bytes still allocated after unload "
            f"(pre-load {pre}; version 2 held {held[-1][0]})")
        below.append(pre - torch.cuda.memory_allocated())
        v1_request()  # ... and after version 1 ran again, exactly the pre-load value
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == pre, (
            f"cycle {i}: {torch.cuda.memory_allocated() - pre:+d} bytes vs. pre-load after unload")
        back += 1
    print(f"\n  cuda: {back}/20 cycles back to exactly the pre-load memory_allocated after unload; "
          f"version 2 allocated {sorted({h[0] for h in held})} bytes at load, net change while it "
          f"replaced version 1 {sorted({h[1] for h in held})}; right after each unload "
          f"{min(below)}..{max(below)} bytes below pre-load (version 1's cuBLAS workspace cleared too)")
