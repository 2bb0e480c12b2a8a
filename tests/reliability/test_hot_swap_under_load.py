"""Scenario 1: hot swap under load.

Concurrent REST (keep-alive) and gRPC clients run for ~10 s while version 2 is copied
into the repository slowly, chunk by chunk; then the weights move 100/0 -> 50/50 -> 0/100
through PUT /v1/models/mlp/routing, then version 1's folder is deleted.

Checked: zero failed requests; every response's version was routable (AVAILABLE with a
positive effective weight) at some moment between sending the request and receiving the
answer, per a timeline recorded on the server loop at every routing-table swap; version 2
never served (nor became AVAILABLE) before its folder was complete; every answer carries
the numbers of the version that claims to have served it.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pytest

from reliability_helpers import (BODY, MLP_YAML, X, answer_of, outputs_of, percentile,
                                 reconciles, wait_reconciled, wait_until)
from runtime.protocol import kserve_grpc as codec
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from runtime.types import VersionState as S

pytestmark = pytest.mark.slow

# At start only version 1 exists (a config naming a missing version is refused at start);
# the canary label arrives with the first PUT, once version 2 is in the repository.
CONFIG = """models:
  mlp:
    labels: {stable: 1}
    weights: {stable: 100}
"""


@dataclass
class Sample:
    proto: str
    t0: float
    t1: float
    ok: bool
    version: int | None
    detail: str = ""


class Timeline:
    """Routable versions of one model after every routing-table swap (on the loop)."""

    def __init__(self, srv, model: str):
        self.model = model
        self.points: list[tuple[float, frozenset[int]]] = []
        self.lifecycle: list[tuple[float, str, int]] = []
        router = srv.core.router
        manager = srv.core.manager

        def install():
            orig = router._rebuild

            def rebuild(m):
                orig(m)
                if m == model:
                    self.points.append((time.monotonic(), self.routable(router)))
            router._rebuild = rebuild
            inner = manager.on_event

            def on_event(ev):
                if ev.model == model:
                    self.lifecycle.append((time.monotonic(), ev.kind, ev.version))
                inner(ev)
            manager.on_event = on_event
            self.points.append((time.monotonic(), self.routable(router)))
        srv.on_loop(install)

    def routable(self, router) -> frozenset[int]:
        return frozenset(v for v, f in router.table(self.model).weights.items() if f > 0)

    def windows(self, version: int) -> list[tuple[float, float]]:
        out, start = [], None
        pts = list(self.points)
        for t, vs in pts:
            if version in vs and start is None:
                start = t
            elif version not in vs and start is not None:
                out.append((start, t))
                start = None
        if start is not None:
            out.append((start, float("inf")))
        return out

    def routable_during(self, version: int, t0: float, t1: float) -> bool:
        return any(a <= t1 and b >= t0 for a, b in self.windows(version))

    def first_routable(self, version: int) -> float | None:
        w = self.windows(version)
        return w[0][0] if w else None


def copy_in_chunks(src, dst, chunks: int = 8, pause: float = 0.35) -> float:
    """Copy a version folder file by file, each file in chunks with pauses longer than the
    quiet period (so the completeness check, not the debounce, must hold the load back).
    Returns the monotonic time at which the last byte was written and the file closed."""
    dst.mkdir()
    for p in sorted(x for x in src.iterdir() if x.is_file()):
        data = p.read_bytes()
        with open(dst / p.name, "wb") as f:
            for i in range(chunks):
                f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
                f.flush()
                if i < chunks - 1:
                    time.sleep(pause)
    return time.monotonic()


def test_hot_swap_under_load(make_repo, serve, version_cache, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_YAML})
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg, quiet_s=0.3)
    assert srv.available("mlp") == [1]
    assert srv.grpc is not None, "the gRPC server is part of this scenario"
    tl = Timeline(srv, "mlp")
    expected = {1: answer_of(1), 2: answer_of(2)}

    samples: list[Sample] = []
    lock = threading.Lock()
    stop = threading.Event()

    def record(s: Sample):
        with lock:
            samples.append(s)

    def rest_client():
        with httpx.Client(base_url=srv.http, timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v2/models/mlp/infer", json=BODY)
                    t1 = time.monotonic()
                    if r.status_code != 200:
                        record(Sample("rest", t0, t1, False, None, f"{r.status_code} {r.text}"))
                    else:
                        doc = r.json()
                        v = int(doc["model_version"])
                        good = v in expected and np.allclose(outputs_of(doc), expected[v], atol=1e-5)
                        record(Sample("rest", t0, t1, good, v, "" if good else "wrong numbers"))
                except httpx.HTTPError as e:
                    record(Sample("rest", t0, time.monotonic(), False, None, repr(e)))
                time.sleep(0.005)

    def grpc_client():
        ch = grpc.insecure_channel(srv.grpc)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(
            model_name="mlp",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 64])],
            raw_input_contents=[X.tobytes()])
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = stub.ModelInfer(req, timeout=30)
                    t1 = time.monotonic()
                    v = int(resp.model_version)
                    out = codec.decode_output(resp.outputs[0], resp.raw_output_contents[0])
                    good = v in expected and np.allclose(out, expected[v], atol=1e-5)
                    record(Sample("grpc", t0, t1, good, v, "" if good else "wrong numbers"))
                except grpc.RpcError as e:
                    record(Sample("grpc", t0, time.monotonic(), False, None, f"{e.code()} {e.details()}"))
                time.sleep(0.005)
        finally:
            ch.close()

    threads = [threading.Thread(target=rest_client, daemon=True) for _ in range(3)]
    threads += [threading.Thread(target=grpc_client, daemon=True) for _ in range(2)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    steps: dict[str, float] = {}
    try:
        time.sleep(1.0)
        steps["copy_start"] = time.monotonic()
        t_complete = copy_in_chunks(version_cache / "st2", repo / "mlp" / "2")
        steps["v2_complete"] = t_complete
        assert srv.wait_state("mlp", 2, S.AVAILABLE, timeout=30), "version 2 never became AVAILABLE"
        steps["v2_available"] = time.monotonic()
        for w1, w2 in ((100, 0), (50, 50), (0, 100)):
            steps[f"put_{w1}_{w2}"] = time.monotonic()
            r = httpx.put(f"{srv.http}/v1/models/mlp/routing", timeout=30, json={
                "labels": {"stable": 1, "canary": 2}, "weights": {"stable": w1, "canary": w2}})
            assert r.status_code == 200, r.text
            steps[f"weights_{w1}_{w2}"] = time.monotonic()
            time.sleep(1.5)
        shutil.rmtree(repo / "mlp" / "1")
        steps["v1_deleted"] = time.monotonic()
        assert srv.wait_for(lambda: srv.available("mlp") == [2], timeout=30)
        assert srv.wait_state("mlp", 1, None, timeout=30)  # unloaded, forgotten with its folder
        steps["v1_end"] = time.monotonic()
        # keep the load on a little after the swap, to at least ~9 s in total
        while time.monotonic() - t_start < 9.0:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    t_end = time.monotonic()

    failed = [s for s in samples if not s.ok]
    by_proto = {p: sum(1 for s in samples if s.proto == p) for p in ("rest", "grpc")}
    by_version = {v: sum(1 for s in samples if s.version == v) for v in (1, 2)}
    lat = [s.t1 - s.t0 for s in samples]
    print(f"\nhot swap: {len(samples)} requests in {t_end - t_start:.1f}s ({by_proto}), "
          f"failed {len(failed)}, served by version {by_version}, "
          f"latency p50 {percentile(lat, 50) * 1e3:.1f} ms p99 {percentile(lat, 99) * 1e3:.1f} ms "
          f"max {max(lat) * 1e3:.1f} ms; steps "
          + ", ".join(f"{k}=+{v - t_start:.2f}s" for k, v in steps.items() if not k.startswith("put_")))

    assert not failed, f"{len(failed)} failed requests, e.g. {[(s.proto, s.detail) for s in failed[:5]]}"
    assert by_proto["rest"] > 50 and by_proto["grpc"] > 50
    assert by_version[1] > 0 and by_version[2] > 0

    # every answer came from a version routable at some moment while the request was open
    stray = [s for s in samples if not tl.routable_during(s.version, s.t0, s.t1)]
    assert not stray, (f"{len(stray)} answers from a version that was not routable then, e.g. "
                       f"{[(s.proto, s.version, s.t0 - t_start, s.t1 - t_start) for s in stray[:5]]}; "
                       f"windows v1={tl.windows(1)} v2={tl.windows(2)}")

    # version 2: never AVAILABLE, routable or served before its folder was complete
    loaded_v2 = [t for t, kind, v in tl.lifecycle if kind == "loaded" and v == 2]
    assert loaded_v2 and min(loaded_v2) > t_complete
    assert not [e for e in tl.lifecycle if e[1] == "failed"], f"a load failed: {tl.lifecycle}"
    assert tl.first_routable(2) > t_complete
    early = [s for s in samples if s.version == 2 and s.t1 <= t_complete]
    assert not early, f"version 2 served {len(early)} requests before its folder was complete"

    # the weights moved traffic as asked: only version 1 under 100/0, only 2 after 0/100
    # (put_* = PUT sent, weights_* = PUT answered: the table swapped in between)
    only_1 = [s for s in samples if s.t0 > steps["v2_complete"] and s.t1 < steps["put_50_50"]]
    assert only_1 and all(s.version == 1 for s in only_1)
    only_2 = [s for s in samples if s.t0 > steps["weights_0_100"]]
    assert only_2 and all(s.version == 2 for s in only_2)
    mid = [s.version for s in samples if steps["weights_50_50"] < s.t0 and s.t1 < steps["put_0_100"]]
    assert 1 in mid and 2 in mid, "50/50 split served only one version"


def test_empty_version_folder_is_not_failed_before_files_arrive(make_repo, serve, version_cache):
    """`mkdir 2`, then a pause longer than the quiet period before the first file: an empty
    folder is a copy that has not started yet, not a broken version."""
    repo = make_repo({"mlp": {1: "st1"}})
    srv = serve(repo, quiet_s=0.2)
    events: list[tuple[str, int]] = []
    inner = srv.core.manager.on_event

    def rec(ev):
        events.append((ev.kind, ev.version))
        inner(ev)
    srv.core.manager.on_event = rec
    before = reconciles(srv, "mlp")
    (repo / "mlp" / "2").mkdir()
    # the watcher fired, the quiet period passed, a pass saw the empty folder and settled
    mgr = srv.core.manager
    assert srv.wait_for(lambda: mgr.reconciles["mlp"] > before
                        and 2 in set(mgr.view().model("mlp").present), 30), "no pass saw folder 2"
    assert wait_reconciled(srv, "mlp", after=before)
    state = mgr.state_of("mlp", 2)
    shutil.copy(version_cache / "st2" / "model.safetensors", repo / "mlp" / "2" / "model.safetensors")
    assert srv.wait_state("mlp", 2, S.AVAILABLE, timeout=30)
    assert wait_until(lambda: srv.available("mlp") == [2], 10)
    assert ("failed", 2) not in events and state is not S.FAILED, (
        f"an empty, just-created version folder was loaded and FAILED (state {state}): the "
        f"quiet timer measures quiet from the newest file, and an empty folder has none")
