"""`--config kubernetes://NAMESPACE/CONFIGMAP`: two replicas share one routing truth through
a loopback stand-in API server (tests/k8s/kubeapi.py). A PUT to one replica is a
resourceVersion compare-and-swap and reaches the other through its watch; an edit of the
ConfigMap reaches both; conflicts are retried without losing the other writer's change;
410 Gone and dropped watches are healed by a relist."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import LiveServer, wait_until
from kubeapi import KubeAPI
from runtime.routing.document import digest
from runtime.config.settings import Settings

pytestmark = pytest.mark.slow  # two replicas per test: ~25 s each on the 2-core VM

NS, CM, KEY = "serving", "splitserve-routing", "splitserve.yaml"
DOC = """# routing, kept in a ConfigMap
models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 100, canary: 0}  # all on stable
"""


@pytest.fixture
def api(tmp_path, monkeypatch):
    a = KubeAPI(token="sa-token")
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    monkeypatch.setenv("SPLITSERVE_KUBE_API", a.url)
    monkeypatch.setenv("SPLITSERVE_KUBE_TOKEN_FILE", str(token))
    a.put(NS, CM, {KEY: DOC, "other": "kept"})
    yield a
    a.close()


@pytest.fixture
def replicas(api, make_repo):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    out = []
    for _ in range(2):
        s = Settings()
        s.server.http_port = s.server.grpc_port = 0
        s.server.drain_timeout_s = 5
        s.repository.path = repo
        s.repository.quiet_s = 0.2
        s.config_source = f"kubernetes://{NS}/{CM}"
        out.append(LiveServer(s))
    yield out
    for srv in out:
        srv.stop()


def weights(srv) -> dict:
    r = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["weights"]


def put(srv, w: dict) -> httpx.Response:
    return httpx.put(f"{srv.http}/v1/models/mlp/routing", timeout=15,
                     json={"labels": {"stable": 1, "canary": 2}, "weights": w})


def test_put_to_one_replica_reaches_the_other_through_the_configmap(api, replicas):
    a, b = replicas
    assert weights(a) == weights(b) == {"stable": 100, "canary": 0}
    t0 = time.monotonic()
    r = put(a, {"stable": 60, "canary": 40})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: weights(b) == {"stable": 60, "canary": 40}, 5)
    took = time.monotonic() - t0
    data = api.data(NS, CM)
    assert data["other"] == "kept"
    assert "# routing, kept in a ConfigMap" in data[KEY] and "canary: 40" in data[KEY]
    assert api.puts == 1
    print(f"configmap PUT: applied on the other replica after {took * 1000:.0f} ms")


def test_an_edit_of_the_configmap_reaches_every_replica(api, replicas):
    api.put(NS, CM, {KEY: DOC.replace("stable: 100, canary: 0", "stable: 5, canary: 95")})
    for srv in replicas:
        assert wait_until(lambda: weights(srv) == {"stable": 5, "canary": 95}, 5)


def test_a_conflict_is_retried_on_the_fresh_document(api, replicas):
    a, b = replicas
    # Someone else changes the ConfigMap between our GET and our PUT: ours gets 409.
    api.before_put = lambda: api.put(NS, CM, {KEY: api.data(NS, CM)[KEY], "other": "theirs"})
    r = put(a, {"stable": 30, "canary": 70})
    assert r.status_code == 200, r.text
    assert api.conflicts == 1 and api.puts == 1
    data = api.data(NS, CM)
    assert data["other"] == "theirs" and "canary: 70" in data[KEY]  # both changes kept
    assert wait_until(lambda: weights(b) == {"stable": 30, "canary": 70}, 5)


def test_gone_and_dropped_watches_heal(api, replicas):
    api.compact()  # every open watch ends; watching from an old resourceVersion is 410 Gone
    api.put(NS, CM, {KEY: DOC.replace("stable: 100, canary: 0", "stable: 1, canary: 1")})
    for srv in replicas:
        assert wait_until(lambda: weights(srv) == {"stable": 1, "canary": 1}, 10)
    api.drop_watches()
    api.put(NS, CM, {KEY: DOC.replace("stable: 100, canary: 0", "stable: 2, canary: 1")})
    for srv in replicas:
        assert wait_until(lambda: weights(srv) == {"stable": 2, "canary": 1}, 10)


def test_an_invalid_edit_keeps_the_last_good_routing(api, replicas):
    api.put(NS, CM, {KEY: "models:\n  mlp:\n    weights: {9: 100}\n"})
    api.put(NS, CM, {KEY: DOC.replace("stable: 100, canary: 0", "stable: 7, canary: 3")})
    for srv in replicas:
        assert wait_until(lambda: weights(srv) == {"stable": 7, "canary": 3}, 5)
    bad = "models: [not, a, mapping\n"
    api.put(NS, CM, {KEY: bad})
    assert wait_until(lambda: all(srv.core.source._hash == digest(bad.encode()) for srv in replicas), 5)
    assert all(weights(srv) == {"stable": 7, "canary": 3} for srv in replicas)


def test_the_cli_reads_server_settings_and_routing_from_the_configmap(api, make_repo):
    from serverproc import ServerProcess

    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    api.put(NS, CM, {KEY: "server:\n  shutdown_delay_s: 0.5\n" + DOC})
    p = ServerProcess(repo, config=f"kubernetes://{NS}/{CM}")
    try:
        p.wait_ready()
        r = httpx.get(f"{p.url}/v1/models/mlp/routing", timeout=10)
        assert r.json()["weights"] == {"stable": 100, "canary": 0}
    finally:
        assert p.stop() == 0, p.log_text(60)
    assert any("event=stopping" in line and "shutdown_delay_s=0.5" in line for line in p.lines()), p.log_text(60)
