"""Startup and shutdown as Kubernetes probes see them, on real `splitserve serve` processes:
live at once and not ready while a routed version loads; a taken port fails before any
load with one line; one start deadline; on SIGTERM readiness is 503 at once while
requests are still served for `server.shutdown_delay_s`, then a clean exit."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from serverproc import ServerProcess

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]}
GATE = '''

# --- test gate: the build waits for a file named "release" beside this module -------
import time as _time
from pathlib import Path as _Path

_build = build_model


def build_model(**kwargs):
    gate, deadline = _Path(__file__).with_name("release"), _time.monotonic() + 60
    while not gate.exists() and _time.monotonic() < deadline:
        _time.sleep(0.02)
    return _build(**kwargs)
'''


def gate_model(model_dir: Path) -> Path:
    """Make the model's build block until `release` exists; returns that path."""
    py = model_dir / "model.py"
    py.write_text(py.read_text() + GATE)
    return model_dir / "release"


ROUTES = "models:\n  mlp:\n    labels: {stable: 1}\n    weights: {stable: 100}\n"


def _config(tmp_path, server: str = "") -> str:
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text((f"server:\n{server}" if server else "") + ROUTES)
    return cfg


def _grpc_ready(target: str) -> tuple[bool, int]:
    with grpc.insecure_channel(target) as ch:
        ready = pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    return ready, status


@pytest.mark.slow
def test_live_at_once_ready_only_when_routed_versions_are_available(make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    release = gate_model(repo / "mlp")
    p = ServerProcess(repo, config=_config(tmp_path))
    try:
        p.wait_listening()
        assert httpx.get(f"{p.url}/v2/health/live", timeout=5).status_code == 200
        r = httpx.get(f"{p.url}/v2/health/ready", timeout=5)
        assert r.status_code == 503 and r.json() == {"ready": False}
        assert _grpc_ready(p.grpc_target) == (False, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not any("event=serving" in line for line in p.lines())
        release.touch()
        p.wait_ready(60)
        assert _grpc_ready(p.grpc_target) == (True, health_pb2.HealthCheckResponse.SERVING)
        r = httpx.post(f"{p.url}/v2/models/mlp/infer", json=BODY, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
    finally:
        assert p.stop() == 0, p.log_text(60)


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_port_in_use_fails_at_once_with_one_line(make_repo, tmp_path, which):
    repo = make_repo({"mlp": {1: "st1"}})
    gate_model(repo / "mlp")  # never released: a load would hang, so failing proves it came first
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        p = ServerProcess(repo, f"--{which}-port", str(port), config=_config(tmp_path))
        t0 = time.monotonic()
        rc = p.wait(60)
        elapsed = time.monotonic() - t0
    finally:
        taken.close()
    errs = [line for line in p.lines() if line.startswith("splitserve:")]
    assert rc == 2, p.log_text(60)
    assert len(errs) == 1 and str(port) in errs[0] and "could not bind" in errs[0], p.log_text(60)
    assert not any("event=version" in line or "event=load" in line for line in p.lines()), p.log_text(60)
    print(f"{which} port in use: exit {rc} after {elapsed:.1f}s: {errs[0].strip()}")


def test_one_start_deadline(make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    gate_model(repo / "mlp")
    p = ServerProcess(repo, config=_config(tmp_path, "  start_timeout_s: 2\n"))
    rc = p.wait(90)
    errs = [line for line in p.lines() if line.startswith("splitserve:")]
    assert rc == 1, p.log_text(60)
    assert len(errs) == 1 and "start deadline of 2s" in errs[0] and "mlp" in errs[0], p.log_text(60)


@pytest.mark.slow
def test_sigterm_readiness_503_at_once_serving_for_the_delay(make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    delay = 2.0
    p = ServerProcess(repo, config=_config(tmp_path, f"  shutdown_delay_s: {delay}\n  drain_timeout_s: 5\n"))
    p.wait_ready()
    results: list[tuple[float, int]] = []  # (time, status) of every request sent
    done = threading.Event()

    def load():
        with httpx.Client(base_url=p.url, timeout=10) as c:
            while not done.is_set():
                try:
                    results.append((time.monotonic(), c.post("/v2/models/mlp/infer", json=BODY).status_code))
                except httpx.TransportError:
                    return  # the listener closed: the delay is over

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        assert _wait(lambda: len(results) > 20)
        t_term = time.monotonic()
        p.send_signal(signal.SIGTERM)
        not_ready_at = None
        with httpx.Client(base_url=p.url, timeout=5) as c:
            while time.monotonic() - t_term < 5:
                if c.get("/v2/health/ready").status_code == 503:
                    not_ready_at = time.monotonic()
                    break
        assert not_ready_at is not None and not_ready_at - t_term < 1.0, p.log_text(60)
        assert _grpc_ready(p.grpc_target)[0] is False
        rc = p.wait(30)
        t_exit = time.monotonic()
    finally:
        done.set()
        t.join(15)
        p.kill()
    assert rc == 0, p.log_text(60)
    served_after = [s for ts, s in results if ts > not_ready_at]
    assert served_after and set(served_after) == {200}, set(served_after)
    assert all(s == 200 for _, s in results)
    assert t_exit - t_term >= delay, (t_exit - t_term, p.log_text(60))
    print(f"SIGTERM: not ready after {1000 * (not_ready_at - t_term):.0f} ms, "
          f"{len(served_after)} requests served during the {delay:g}s delay, exit after "
          f"{t_exit - t_term:.1f}s")


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
