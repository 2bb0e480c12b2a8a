"""Version lifecycle with real files, real filesystem events and real torch models."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import shutil
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import MLP_YAML, expected_output, wait_until
from runtime.types import VersionState as S

X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": X.ravel().tolist()}]}


def infer(srv, version=None, timeout=30):
    path = f"/v2/models/mlp/versions/{version}/infer" if version else "/v2/models/mlp/infer"
    return httpx.post(srv.http + path, json=BODY, timeout=timeout)


def answer_of(seed):
    return expected_output(seed, torch.from_numpy(X)).numpy()


def outputs(r):
    return np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 8)


class Recorder:
    """Lifecycle events as the manager reports them (kind, version)."""

    def __init__(self, srv):
        self.events = []
        inner = srv.core.manager.on_event

        def rec(ev):
            self.events.append((ev.kind, ev.version))
            inner(ev)
        srv.core.manager.on_event = rec


def copy_slowly(src, dst, seconds=1.0):
    """Copy a version folder file by file, in chunks, over about `seconds`."""
    dst.mkdir()
    files = sorted(p for p in src.iterdir() if p.is_file())
    for p in files:
        data = p.read_bytes()
        with open(dst / p.name, "wb") as f:
            for i in range(4):
                f.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
                f.flush()
                time.sleep(seconds / (4 * len(files)))


def test_dropping_a_version_loads_it_and_unloads_the_old(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo)
    rec = Recorder(srv)
    assert srv.available("mlp") == [1]
    copy_slowly(version_cache / "st2", repo / "mlp" / "2", seconds=1.2)
    assert srv.wait_state("mlp", 2, S.AVAILABLE)
    assert srv.wait_state("mlp", 1, S.END)
    assert srv.available("mlp") == [2]
    np.testing.assert_allclose(outputs(infer(srv)), answer_of(2), rtol=1e-5, atol=1e-6)
    assert ("failed", 2) not in rec.events
    assert rec.events.index(("loaded", 2)) < rec.events.index(("unloaded", 1))


def test_temp_name_then_rename_publishes_atomically(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo)
    shutil.copytree(version_cache / "pt2_2", repo / "mlp" / ".2.tmp")
    os.rename(repo / "mlp" / ".2.tmp", repo / "mlp" / "2")
    assert srv.wait_for(lambda: srv.available("mlp") == [2])
    np.testing.assert_allclose(outputs(infer(srv)), answer_of(2), rtol=1e-5, atol=1e-6)


def test_corrupt_weights_fail_with_reason_while_old_keeps_serving(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo, incomplete_grace_s=0.5)
    bad = repo / "mlp" / "2"
    bad.mkdir()
    data = (version_cache / "st2" / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert srv.wait_state("mlp", 2, S.FAILED)
    status = {s.version: s for s in srv.core.manager.models["mlp"].statuses()}
    assert "truncated" in status[2].error
    r = infer(srv)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    np.testing.assert_allclose(outputs(r), answer_of(1), rtol=1e-5, atol=1e-6)
    # fixing the folder (new fingerprint) retries and succeeds
    shutil.copy(version_cache / "st2" / "model.safetensors", bad / "model.safetensors")
    assert srv.wait_state("mlp", 2, S.AVAILABLE)
    assert srv.wait_for(lambda: srv.available("mlp") == [2])


def test_bad_model_yaml_keeps_last_good_settings(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo)
    (repo / "mlp" / "model.yaml").write_text(MLP_YAML.replace("device: auto", "device: tpu"))
    entry = srv.core.manager.models["mlp"]
    assert srv.wait_for(lambda: entry.spec_error is not None)
    assert "device" in entry.spec_error
    assert infer(srv).status_code == 200
    assert srv.available("mlp") == [1]


def test_version_folder_without_a_loadable_file_fails_only_after_the_grace(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo, incomplete_grace_s=1.5)
    d = repo / "mlp" / "8"
    d.mkdir()
    (d / "model.pth").write_bytes(b"weights in a format the loader does not read")
    assert srv.wait_state("mlp", 8, S.FAILED, timeout=30)
    v8 = srv.core.manager.view().model("mlp").version(8)
    assert v8.error == ("no loadable file in mlp/8/: found model.pth; expected one of "
                        "model.pt2, model.safetensors (+ model.py), model.pt")
    changed = max(d.stat().st_mtime, (d / "model.pth").stat().st_mtime)
    assert v8.since - changed >= 1.5, "FAILED before the folder was quiet for incomplete_grace_s"
    r = infer(srv)  # what served keeps serving
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"


def test_waiting_out_the_grace_neither_spins_nor_holds_start(make_repo, serve, version_cache):
    """A stalled copy (truncated weights) waits incomplete_grace_s with a timer, not by
    rescanning, and the server starts (is settled) meanwhile: FAILED comes later."""
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_YAML.replace("{latest: 1}", "all")})
    data = (version_cache / "st2" / "model.safetensors").read_bytes()
    (repo / "mlp" / "2").mkdir()
    (repo / "mlp" / "2" / "model.safetensors").write_bytes(data[: len(data) // 3])
    t0 = time.monotonic()
    srv = serve(repo, incomplete_grace_s=3)
    start_s = time.monotonic() - t0
    assert srv.available("mlp") == [1] and srv.core.manager.state_of("mlp", 2) is None
    mgr = srv.core.manager
    before = srv.on_loop(lambda: mgr.reconciles["mlp"])
    assert srv.wait_state("mlp", 2, S.FAILED, timeout=30)
    passes = srv.on_loop(lambda: mgr.reconciles["mlp"]) - before
    assert "truncated" in mgr.view().model("mlp").version(2).error
    assert passes <= 5, f"{passes} reconcile passes while waiting out a 3 s grace"
    assert start_s < 3, f"start waited {start_s:.1f}s for a folder's incomplete_grace_s"


def test_a_version_folder_still_arriving_is_not_failed_within_the_grace(make_repo, serve,
                                                                        version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo, incomplete_grace_s=60)
    rec = Recorder(srv)
    mgr = srv.core.manager
    before = srv.on_loop(lambda: mgr.reconciles["mlp"])
    (repo / "mlp" / "2").mkdir()  # `cp -r` makes the folder first, the files later
    assert srv.wait_for(lambda: mgr.reconciles["mlp"] > before and 2 in mgr.view().model("mlp").present)
    assert mgr.state_of("mlp", 2) is None  # seen, empty, waiting: not FAILED
    shutil.copy(version_cache / "pt2_2" / "model.pt2", repo / "mlp" / "2" / "model.pt2")
    assert srv.wait_state("mlp", 2, S.AVAILABLE)
    assert ("failed", 2) not in rec.events


@pytest.mark.parametrize("src,seed", [("st1", 1), ("pt2_2", 2), ("ts4", 4)])
def test_each_format_answers_with_its_numbers(make_repo, serve, src, seed):
    srv = serve(make_repo({"mlp": {3: src}}))
    r = infer(srv)
    assert r.status_code == 200 and r.headers["x-model-version"] == "3"
    np.testing.assert_allclose(outputs(r), answer_of(seed), rtol=1e-5, atol=1e-6)


def test_overwrite_in_place_reloads_without_downtime(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo)
    tmp = repo / "mlp" / "1" / ".model.safetensors.tmp"
    shutil.copy(version_cache / "st3" / "model.safetensors", tmp)
    os.replace(tmp, repo / "mlp" / "1" / "model.safetensors")
    # the HTTP call happens on this thread: poll it here, never on the server's loop
    assert wait_until(lambda: np.allclose(outputs(infer(srv)), answer_of(3), atol=1e-6), 30)
    assert srv.available("mlp") == [1]


def test_deleting_newest_brings_previous_back_first(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    srv = serve(repo)
    rec = Recorder(srv)
    assert srv.available("mlp") == [2]
    shutil.rmtree(repo / "mlp" / "2")
    assert srv.wait_for(lambda: srv.available("mlp") == [1])
    assert srv.wait_state("mlp", 2, None)  # unloaded, and forgotten with its folder
    assert rec.events.index(("loaded", 1)) < rec.events.index(("unloaded", 2))
    np.testing.assert_allclose(outputs(infer(srv)), answer_of(1), rtol=1e-5, atol=1e-6)


SLOW_ARCH = '''
import time, torch
from torch import nn
class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)
    def forward(self, input):
        time.sleep(0.4)
        return self.lin(input)
def build_model():
    return Slow()
'''


def test_deleting_a_version_completes_inflight_requests(make_repo, serve, tmp_path):
    from safetensors.torch import save_file
    repo = make_repo({})
    m = repo / "slow"
    m.mkdir()
    (m / "model.py").write_text(SLOW_ARCH)
    (m / "model.yaml").write_text("inputs: [{name: input, datatype: FP32, shape: [-1, 64]}]\n"
                                  "outputs: [{name: output, datatype: FP32, shape: [-1, 8]}]\n"
                                  "max_batch_size: 8\nversion_policy: all\nwarmup: false\n")
    for v in (1, 2):
        (m / str(v)).mkdir()
        torch.manual_seed(v)
        lin = torch.nn.Linear(64, 8)
        save_file({f"lin.{k}": t for k, t in lin.state_dict().items()}, str(m / str(v) / "model.safetensors"))
    srv = serve(repo)
    assert srv.wait_for(lambda: srv.available("slow") == [1, 2])
    url = srv.http + "/v2/models/slow/versions/2/infer"
    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(httpx.post, url, json=BODY, timeout=30) for _ in range(6)]
        assert wait_until(lambda: srv.core.manager.models["slow"].serving[2].inflight > 0, 10)
        shutil.rmtree(m / "2")
        results = [f.result() for f in futs]
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
    assert all(r.headers["x-model-version"] == "2" for r in results)
    assert srv.wait_for(lambda: srv.available("slow") == [1])
    assert httpx.post(url, json=BODY).status_code in (404, 503)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_unload_cycles_do_not_leak(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo, quiet_s=0.05)
    m = repo / "mlp"

    def cycle(i):
        shutil.copytree(version_cache / "st2", m / ".2.tmp")
        os.rename(m / ".2.tmp", m / "2")
        assert srv.wait_for(lambda: srv.available("mlp") == [2]), f"cycle {i}: v2 never served"
        shutil.rmtree(m / "2")
        assert srv.wait_for(lambda: srv.available("mlp") == [1]), f"cycle {i}: v1 never back"

    for i in range(5):  # warm up allocators and caches
        cycle(i)
    gc.collect()
    before = _rss()
    for i in range(50):
        cycle(i)
    gc.collect()
    grown = _rss() - before
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB over 50 load/unload cycles"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_placement_and_memory_back_after_unload(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_YAML.replace("device: auto", "device: cuda")})
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    srv = serve(repo)
    h = srv.core.manager.models["mlp"].serving[1]
    assert h.loaded.device.type == "cuda"
    assert next(h.loaded.module.parameters()).is_cuda
    assert h.loaded.memory_bytes > 0
    np.testing.assert_allclose(outputs(infer(srv)), answer_of(1), rtol=1e-4, atol=1e-5)
    srv.call(srv.core.manager.unload_model("mlp"))
    assert wait_until(lambda: torch.cuda.memory_allocated() == base, 10), \
        f"{torch.cuda.memory_allocated() - base} bytes still allocated after unload"
