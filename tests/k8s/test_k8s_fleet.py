"""A fleet without Kubernetes: three `splitserve serve` processes sharing one repository
folder and one config file behind a real HAProxy that health-checks /v2/health/ready
(what a Service does with readiness). Sticky keys agree across replicas, a routing PUT to
one replica is in force on all three within 2 s, a new version folder is served by all
three, the summed Prometheus counters equal the client's count, and a SIGTERM to one
replica under load fails no request. Figures are printed (pytest -s)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import make_example_models as mk  # noqa: E402

HAPROXY = shutil.which("haproxy")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")]

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]}
CONFIG = """server:
  shutdown_delay_s: 1.5
  drain_timeout_s: 5
models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 50, canary: 50}
    sticky: {header: x-user-id}
"""
HAPROXY_CFG = """global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend fe
    bind fd@{fd}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    timeout check 3s
    default-server inter 200ms fastinter 100ms fall 3 rise 2
    http-response set-header x-replica %[srv_name]
{servers}
"""


class Fleet:
    def __init__(self, base: Path):
        self.repo = base / "repo"
        mk.write_model_folder(self.repo / "mlp", (ROOT / "model_repository" / "mlp" / "model.yaml").read_text())
        mk.write_safetensors(self.repo / "mlp" / "1", seed=1)
        mk.write_safetensors(self.repo / "mlp" / "2", seed=2)
        mk.write_safetensors(base / "v3", seed=3)
        self.spare = base / "v3"
        self.config = base / "splitserve.yaml"
        self.config.write_text(CONFIG)
        self.replicas = [ServerProcess(self.repo, config=self.config) for _ in range(3)]
        for r in self.replicas:
            r.wait_ready(180)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        servers = "\n".join(f"    server r{i} {r.http_hostport} check"
                            for i, r in enumerate(self.replicas))
        cfg = base / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.replace("{fd}", str(self.sock.fileno())).replace("{servers}", servers))
        self.haproxy = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], pass_fds=[self.sock.fileno()],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent = 0  # infer requests the client made (all must succeed)
        self._lock = threading.Lock()

    def infer(self, client: httpx.Client, key: str | None = None, version: int | None = None) -> httpx.Response:
        path = "/v2/models/mlp" + (f"/versions/{version}" if version else "") + "/infer"
        r = client.post(path, json=BODY, headers={"x-user-id": key} if key else {})
        with self._lock:
            self.sent += 1
        return r

    def wait_all_up(self, timeout: float = 30) -> None:
        """Until HAProxy has sent traffic to every replica (each passed its checks)."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while time.monotonic() < deadline and len(seen) < 3:
                r = c.get("/v2/health/ready")
                if r.status_code == 200:
                    seen.add(r.headers["x-replica"])
        assert len(seen) == 3, seen

    def close(self) -> None:
        self.haproxy.terminate()
        self.haproxy.wait(10)
        for r in self.replicas:
            rc = r.stop()
            assert rc == 0, r.log_text(60)
        self.sock.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        f.wait_all_up()
        yield f
    finally:
        f.close()


def test_sticky_keys_are_served_by_one_version_whichever_replica(fleet):
    keys = [f"user-{i}" for i in range(300)]
    served: dict[str, set[str]] = defaultdict(set)
    replicas: dict[str, set[str]] = defaultdict(set)
    t0 = time.monotonic()

    local = threading.local()
    clients: list[httpx.Client] = []

    def one(i: int):
        key = keys[i % len(keys)]
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=fleet.url, timeout=30)
            clients.append(local.c)
        return key, fleet.infer(local.c, key)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(1500)))
    for c in clients:
        c.close()
    took = time.monotonic() - t0
    bad = [(r.status_code, r.headers.get("x-replica"), r.text[:200]) for _, r in results if r.status_code != 200]
    assert not bad, bad[:5]
    for key, r in results:
        served[key].add(r.json()["model_version"])
        replicas[key].add(r.headers["x-replica"])
    assert all(len(v) == 1 for v in served.values()), {k: v for k, v in served.items() if len(v) > 1}
    multi = sum(len(v) > 1 for v in replicas.values())
    # Keys must really cross replicas for the check above to mean anything. Round robin over
    # three gives ~296 of 300 on a quiet machine; a replica that misses a health check under
    # load sits out a while (219 seen on a loaded 2-core VM, 147 in one CI run). Stickiness is
    # shown by every key that crossed; 50 crossing keys (1 in 6) already make a version
    # switch across replicas unmissable, so that is the floor, not a share of a quiet run.
    assert multi >= 50, multi
    versions = Counter(next(iter(v)) for v in served.values())
    assert set(versions) == {"1", "2"} and min(versions.values()) > 100, versions
    print(f"fleet sticky: 1500 requests, 300 keys, 0 failures, {multi} keys answered by >1 replica, "
          f"keys per version {dict(versions)}, {1500 / took:.0f} req/s through haproxy")


def test_routing_put_to_one_replica_is_in_force_on_all_three_within_2s(fleet):
    r0 = fleet.replicas[0]
    new = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 80, "canary": 20},
           "sticky": {"header": "x-user-id"}}
    t0 = time.monotonic()
    r = httpx.put(f"{r0.url}/v1/models/mlp/routing", json=new, timeout=10)
    assert r.status_code == 200, r.text
    pending = {p.url for p in fleet.replicas}
    reached: dict[str, float] = {}
    while pending and time.monotonic() - t0 < 5:
        for url in list(pending):
            if httpx.get(f"{url}/v1/models/mlp/routing", timeout=5).json()["weights"] == {"stable": 80, "canary": 20}:
                reached[url] = time.monotonic() - t0
                pending.discard(url)
        time.sleep(0.01)
    assert not pending, f"not applied on {pending}"
    assert max(reached.values()) < 2.0, reached
    print(f"fleet PUT: in force on all three after {max(reached.values()) * 1000:.0f} ms "
          f"({', '.join(f'{v * 1000:.0f}' for v in sorted(reached.values()))} ms)")


def test_new_version_folder_is_served_by_all_three(fleet):
    tmp = fleet.repo / "mlp" / ".3.tmp"
    shutil.copytree(fleet.spare, tmp)
    t0 = time.monotonic()
    os.rename(tmp, fleet.repo / "mlp" / "3")
    for p in fleet.replicas:
        deadline = time.monotonic() + 60
        while httpx.get(f"{p.url}/v2/models/mlp/versions/3/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, p.log_text(60)
            time.sleep(0.05)
    took = time.monotonic() - t0
    by_replica = Counter()
    with httpx.Client(base_url=fleet.url, timeout=30) as c:
        for _ in range(30):
            r = fleet.infer(c, version=3)
            assert r.status_code == 200 and r.json()["model_version"] == "3", r.text
            by_replica[r.headers["x-replica"]] += 1
    assert set(by_replica) == {"r0", "r1", "r2"}, by_replica
    print(f"fleet new version: AVAILABLE on all three {took:.1f}s after the rename")


def _served(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0
    for fam in text_string_to_metric_families(text):
        if fam.name == "splitserve_requests":
            total += sum(int(s.value) for s in fam.samples
                         if s.name == "splitserve_requests_total" and s.labels.get("model") == "mlp")
    return total


def test_summed_prometheus_counters_equal_the_clients_count(fleet):
    counts = [_served(p.url) for p in fleet.replicas]
    assert sum(counts) == fleet.sent, (counts, fleet.sent)
    assert all(c > 0 for c in counts)
    print(f"fleet metrics: replicas counted {counts}, sum {sum(counts)} == client {fleet.sent}")


def test_sigterm_to_one_replica_under_load_fails_nothing(fleet):
    victim = fleet.replicas[2]
    codes: Counter = Counter()
    errors: list[str] = []
    stop = threading.Event()

    def load(worker: int):
        with httpx.Client(base_url=fleet.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = fleet.infer(c, f"load-{worker}-{i % 50}")
                    codes[r.status_code] += 1
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                i += 1

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(6)]
    for t in threads:
        t.start()
    while sum(codes.values()) < 200:
        time.sleep(0.01)
    t0 = time.monotonic()
    victim.send_signal(signal.SIGTERM)
    rc = victim.wait(60)
    gone = time.monotonic() - t0
    n_at_exit = sum(codes.values())
    while sum(codes.values()) < n_at_exit + 200:  # and the two left carry on
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(30)
    assert rc == 0, victim.log_text(60)
    assert not errors and set(codes) == {200}, (codes, errors[:5])
    print(f"fleet SIGTERM: {sum(codes.values())} requests under load, 0 failures; the replica "
          f"exited {gone:.1f}s after SIGTERM")
