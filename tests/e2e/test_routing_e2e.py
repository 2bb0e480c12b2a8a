"""Routing against live servers on loopback, over real HTTP: sticky assignment across a
restart, minimal movement on re-weighting, failover, label moves, shadow traffic, config
hot reload, API persistence, validation and auth.

Every wait is on a state (a routing state over HTTP, a version state on the server loop,
a log record of the server), never a sleep. Server processes and the 10,000-request
chi-square test are in test_routing_processes.py.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import MLP_YAML, expected_output, wait_until
from router.assign import stable_unit

ALL_VERSIONS_YAML = MLP_YAML.replace("{latest: 1}", "all")
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                  "data": X.ravel().tolist()}]})
JSON = {"content-type": "application/json"}
TOKEN = "s3cret-token"


# ---- helpers -----------------------------------------------------------------------
def write_config(path: Path, text: str, atomic: bool = False) -> None:
    """Write the config file in place (truncate + write) or atomically (temp + rename)."""
    if atomic:
        tmp = path.with_name(f".{path.name}.edit")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        with open(path, "w") as f:
            f.write(text)


def routing(srv) -> dict:
    r = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def put_routing(srv, body, token: str | None = None, auth: str | None = None) -> httpx.Response:
    headers = dict(JSON)
    if auth is not None:
        headers["authorization"] = auth
    elif token is not None:
        headers["authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.put(f"{srv.http}/v1/models/mlp/routing", content=content, headers=headers, timeout=30)


def send(srv, n: int = 0, keys: list[str] | None = None, threads: int = 1,
         path: str = "/v2/models/mlp/infer") -> list[tuple[str, str]]:
    """(x-model-version, x-route) of each request: n unkeyed ones, or one per key (in the
    order of `keys`). Persistent connections; one client thread by default, since the
    in-process server shares this process's GIL and more threads only contend for it."""
    items: list[str | None] = list(keys) if keys is not None else [None] * n
    idx = list(range(len(items)))
    chunks = [idx[i::threads] for i in range(threads)]
    out: list[tuple[str, str] | None] = [None] * len(items)

    def run(chunk):
        with httpx.Client(base_url=srv.http, timeout=30) as c:
            for i in chunk:
                key = items[i]
                headers = JSON if key is None else {**JSON, "x-user-id": key}
                r = c.post(path, content=BODY, headers=headers)
                assert r.status_code == 200, r.text
                out[i] = (r.headers["x-model-version"], r.headers["x-route"])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, chunks))
    return out  # type: ignore[return-value]


def versions_of(results: list[tuple[str, str]]) -> list[str]:
    return [v for v, _ in results]


def stop(srv) -> None:
    """Stop a LiveServer now (a restart); the fixture's own stop later is then a no-op."""
    srv.stop()
    srv.stop = lambda: None


def sticky_expected(user: str, bands: list[tuple[float, str]]) -> str:
    """The version whose cumulative band [.., edge) holds the user's stable unit."""
    u = stable_unit("mlp", user)
    for edge, v in bands:
        if u < edge:
            return v
    return bands[-1][1]


class ConfigLog(logging.Handler):
    """Collects the server's control log records (config applied / rejected)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append((time.monotonic(), record.getMessage()))

    def since(self, t: float, text: str) -> list[str]:
        with self._lock:
            return [m for at, m in self.records if at >= t and text in m]


@pytest.fixture
def control_log():
    h = ConfigLog()
    log = logging.getLogger("splitserve.control")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(h)
    yield h
    log.removeHandler(h)
    log.setLevel(old_level)


SPLIT_90_10 = """\
models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 90, canary: 10}
    sticky: {header: x-user-id}
"""


# ---- the HTTP server itself ----------------------------------------------------------
def test_keepalive_responses_are_not_held_back(make_repo, serve):
    """Persistent connections must answer at once. Accepted sockets without TCP_NODELAY
    hold the second write of each response until the client's delayed ACK (~40 ms)."""
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    with httpx.Client(base_url=srv.http, timeout=10) as c:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert c.post("/v2/models/mlp/infer", content=BODY, headers=JSON).status_code == 200
            times.append(time.perf_counter() - t0)
    assert statistics.median(times[1:]) < 0.025, f"median {statistics.median(times[1:]) * 1e3:.1f} ms"


# ---- sticky ------------------------------------------------------------------------
def test_sticky_users_keep_their_version_across_requests_and_restart(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(SPLIT_90_10)
    users = [f"user-{i}" for i in range(500)]
    expected = [sticky_expected(u, [(0.9, "1"), (1.0, "2")]) for u in users]

    srv = serve(repo, config=cfg)
    first = send(srv, keys=users)
    second = send(srv, keys=users[::-1])[::-1]  # another order, other connections
    assert {how for _, how in first + second} == {"sticky"}
    assert versions_of(first) == versions_of(second) == expected
    assert 20 <= expected.count("2") <= 85  # ~10% of 500 (sd ~6.7): the hash spreads users
    assert {how for _, how in send(srv, 10)} == {"split"}  # no key header: an unkeyed split
    stop(srv)

    srv2 = serve(repo, config=cfg)
    assert versions_of(send(srv2, keys=users)) == expected


def test_reweight_moves_only_the_users_needed(make_repo, serve, tmp_path):
    """Canary 10 -> 20: users move only from stable to canary, about 10% of them."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(SPLIT_90_10)
    srv = serve(repo, config=cfg)
    users = [f"u{i:05d}" for i in range(2000)]
    before = versions_of(send(srv, keys=users))
    r = put_routing(srv, {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 80, "canary": 20},
                          "sticky": {"header": "x-user-id"}})
    assert r.status_code == 200, r.text
    assert r.json()["effective"]["weights"] == pytest.approx({"1": 0.8, "2": 0.2})
    after = versions_of(send(srv, keys=users))
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert set(moved) <= {("1", "2")}, "a user moved other than stable -> canary"
    assert 0.06 * len(users) <= len(moved) <= 0.14 * len(users), len(moved)  # ~10% (sd 0.67%)
    # Exactly the users whose stable unit lies in the band that changed hands, [0.8, 0.9).
    assert {u for u, b, a in zip(users, before, after, strict=True) if b != a} == \
        {u for u in users if 0.8 <= stable_unit("mlp", u) < 0.9}


# ---- failover ----------------------------------------------------------------------
def test_failed_and_unloaded_versions_get_no_traffic(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    bad = repo / "mlp" / "3"  # a complete folder that fails to load: wrong tensors
    bad.mkdir()
    save_file({"bogus": torch.zeros(4)}, str(bad / "model.safetensors"))
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    weights: {1: 50, 2: 30, 3: 20}\n    sticky: {header: x-user-id}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("mlp") == [1, 2]
    assert srv.core.manager.state_of("mlp", 3).value == "FAILED"

    eff = routing(srv)["effective"]
    assert eff["available"] == [1, 2]
    assert eff["unavailable"] == [3]
    assert eff["weights"] == pytest.approx({"1": 0.625, "2": 0.375})  # 50:30 of what is left
    assert sum(eff["weights"].values()) == pytest.approx(1.0)
    assert "3" in eff["note"]

    unkeyed = versions_of(send(srv, 200))
    assert set(unkeyed) == {"1", "2"}
    users = [f"f{i}" for i in range(300)]
    got = versions_of(send(srv, keys=users))
    for u, v in zip(users, got, strict=True):
        x = stable_unit("mlp", u)
        if x < 0.5:
            assert v == "1", u  # keys of AVAILABLE versions do not move
        elif x < 0.8:
            assert v == "2", u
        else:  # version 3's band, spread over 1 and 2 in proportion to 50:30
            assert v == ("1" if (x - 0.8) / 0.2 < 0.625 else "2"), u
    r = httpx.post(f"{srv.http}/v2/models/mlp/versions/3/infer", content=BODY, headers=JSON)
    assert r.status_code == 503 and "FAILED" in r.json()["error"]

    # Version 2 goes away (its folder is removed, so it is unloaded): 1 takes everything.
    away = tmp_path / "v2-away"
    (repo / "mlp" / "2").rename(away)
    assert srv.wait_for(lambda: srv.available("mlp") == [1], timeout=30)
    eff = routing(srv)["effective"]
    assert eff["unavailable"] == [2, 3]
    assert eff["weights"] == pytest.approx({"1": 1.0})
    assert set(versions_of(send(srv, 50))) == {"1"}
    assert set(versions_of(send(srv, keys=users[:50]))) == {"1"}

    # It comes back: still named by the weights, so it is loaded and gets its share again.
    away.rename(repo / "mlp" / "2")
    assert srv.wait_for(lambda: srv.available("mlp") == [1, 2], timeout=60)
    eff = routing(srv)["effective"]
    assert eff["unavailable"] == [3]
    assert eff["weights"] == pytest.approx({"1": 0.625, "2": 0.375})
    assert versions_of(send(srv, keys=users)) == got


# ---- labels ------------------------------------------------------------------------
def test_label_moves_only_once_its_new_version_is_available(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2", 3: "st3"}})  # policy latest: 1 -> only 3
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 3, canary: 2}\n"
                   "    weights: {stable: 90, canary: 10}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("mlp") == [2, 3]  # 2 is kept loaded because a label names it
    assert srv.core.manager.state_of("mlp", 1) is None  # on disk, never loaded

    new = {"labels": {"stable": 3, "canary": 1}, "weights": {"stable": 90, "canary": 10}}
    r = put_routing(srv, new)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == {"stable": 3, "canary": 1}  # the config as given
    assert body["effective"]["pending_labels"] == {"canary": 1}
    assert body["effective"]["labels"] == {"stable": 3, "canary": 2}  # not moved yet
    assert "canary" in body["note"] and "load" in body["note"]

    # While version 1 loads, the label never points at a version that is not AVAILABLE,
    # and requests keep being served.
    seen = []

    def moved() -> bool:
        eff = routing(srv)["effective"]
        seen.append(eff)
        assert set(versions_of(send(srv, 4))) <= {"1", "2", "3"}
        return eff["labels"]["canary"] == 1

    assert wait_until(moved, timeout=60, interval=0.01)
    for eff in seen:
        assert eff["labels"]["canary"] in eff["available"], eff
        assert eff["labels"]["canary"] in (1, 2)
    assert seen[-1]["pending_labels"] == {}
    assert seen[-1]["weights"] == pytest.approx({"1": 0.1, "3": 0.9})
    # The old canary is no longer named by any route nor by the policy: it is released.
    assert srv.wait_for(lambda: srv.available("mlp") == [1, 3], timeout=30)
    assert set(versions_of(send(srv, 100))) <= {"1", "3"}


# ---- shadow ------------------------------------------------------------------------
def test_shadow_copies_are_recorded_and_never_returned(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n    weights: {stable: 100}\n"
                   "    shadow: {target: canary, percent: 100}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("mlp") == [1, 2]  # 2 is loaded only because the shadow names it
    assert routing(srv)["effective"]["shadow"] == {"target": 2, "percent": 100}

    recorded = []
    record_shadow = srv.core.metrics.record_shadow

    def recorder(model, primary, shadow, ok, diff, agree):
        recorded.append((model, primary, shadow, ok, diff, agree))
        return record_shadow(model, primary, shadow, ok, diff, agree)

    srv.core.metrics.record_shadow = recorder

    n = 150
    want = expected_output(1, torch.from_numpy(X)).numpy()
    with httpx.Client(base_url=srv.http, timeout=30) as c:  # one at a time: no shadow is dropped
        for _ in range(n):
            r = c.post("/v2/models/mlp/infer", content=BODY, headers=JSON)
            assert r.status_code == 200, r.text
            assert (r.headers["x-model-version"], r.headers["x-route"]) == ("1", "split")
            out = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 8)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)  # stable's answer

    assert srv.wait_for(lambda: len(recorded) >= n, timeout=30), len(recorded)
    assert srv.core.inference.shadow_dropped == 0
    assert len(recorded) == n
    assert {(m, p, s, ok) for m, p, s, ok, _, _ in recorded} == {("mlp", 1, 2, True)}
    assert all(d is not None and d > 0 for *_, d, _ in recorded)  # different weights
    assert all(a is not None for *_, a in recorded)

    # The A/B summary reports them under the shadow version; the shadow runs are not
    # counted as routed traffic.
    summary = httpx.get(f"{srv.http}/v1/models/mlp/metrics", timeout=10).json()
    rows = {row["version"]: row for row in summary["versions"]}
    sh = rows["2"]["shadow"]
    assert sh["comparisons"] == n and sh["failures"] == 0
    assert sh["primary_versions"] == ["1"]
    assert sh["max_abs_diff"] > 0
    assert 0.0 <= sh["argmax_agreement"] <= 1.0
    assert rows["1"]["routed_requests"] == n
    assert rows["2"]["routed_requests"] == 0
    assert rows["1"]["observed_share"] == 1.0


# ---- config hot reload -------------------------------------------------------------
@pytest.mark.parametrize("atomic", [False, True], ids=["in-place", "atomic-rename"])
def test_config_file_hot_reload_good_and_bad_edits(make_repo, serve, tmp_path, control_log, atomic):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": ALL_VERSIONS_YAML})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    weights: {1: 100}\n")
    srv = serve(repo, config=cfg)
    assert srv.available("mlp") == [1, 2]
    assert routing(srv)["weights"] == {"1": 100}
    assert set(versions_of(send(srv, 20))) == {"1"}

    # A good edit applies without a restart.
    write_config(cfg, "# edited\nmodels:\n  mlp:\n    labels: {canary: 2}\n    weights: {canary: 100}\n",
                 atomic=atomic)
    assert wait_until(lambda: routing(srv)["weights"] == {"canary": 100}, timeout=30)
    good = routing(srv)
    assert good["effective"]["weights"] == {"2": 1.0}
    assert set(versions_of(send(srv, 20))) == {"2"}

    # Bad edits are rejected with a logged reason; the last good config stays in force.
    bad_edits = [
        ("models:\n  mlp:\n    weights: {canary: 100\n", "not valid YAML"),
        ("models:\n  mlp:\n    labels: {canary: 2}\n    weights: {canary: -5}\n", "weights.canary"),
        ("models:\n  mlp:\n    labels: {canary: 9}\n    weights: {canary: 100}\n", "version 9"),
    ]
    for text, reason in bad_edits:
        t0 = time.monotonic()
        write_config(cfg, text, atomic=atomic)
        assert wait_until(lambda: control_log.since(t0, "config_rejected"), timeout=30), (text, control_log.records)
        assert any(reason in m for m in control_log.since(t0, "config_rejected")), control_log.records
        assert routing(srv) == good
        assert set(versions_of(send(srv, 20))) == {"2"}

    # And a good edit after bad ones applies again.
    write_config(cfg, "models:\n  mlp:\n    weights: {1: 1, 2: 1}\n", atomic=atomic)
    assert wait_until(lambda: routing(srv)["weights"] == {"1": 1, "2": 1}, timeout=30)
    assert set(versions_of(send(srv, 60))) == {"1", "2"}


# ---- API persistence ---------------------------------------------------------------
COMMENTED = """\
# splitserve routing config (hand-written; comments must survive API writes)
other: {keep: me}   # not ours

models:
  mlp:
    # stable is what users see
    labels: {stable: 1, canary: 2}
    weights:
      stable: 90    # most traffic
      canary: 10    # the experiment
"""


def test_put_routing_is_persisted_with_comments_and_survives_restart(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(COMMENTED)
    srv = serve(repo, config=cfg)
    new = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 70, "canary": 30},
           "sticky": {"header": "x-user-id"}, "shadow": {"target": "canary", "percent": 5}}
    r = put_routing(srv, new)
    assert r.status_code == 200, r.text
    state = r.json()
    assert {k: state[k] for k in new} == new
    assert state["effective"]["weights"] == pytest.approx({"1": 0.7, "2": 0.3})

    text = cfg.read_text()
    doc = yaml.safe_load(text)
    assert doc["models"]["mlp"] == new
    assert doc["other"] == {"keep": "me"}
    for comment in ("# splitserve routing config", "# not ours", "# stable is what users see",
                    "# most traffic", "# the experiment"):
        assert comment in text, f"{comment!r} lost:\n{text}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left
    assert routing(srv) == state  # the watcher re-reading our own write changes nothing
    stop(srv)

    srv2 = serve(repo, config=cfg)
    again = routing(srv2)
    assert {k: again[k] for k in new} == new
    assert again["effective"] == state["effective"]


# ---- validation --------------------------------------------------------------------
BAD_PUTS = [  # (what is wrong, body, fragments the 400's message must contain)
    ("unknown key", {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90}, "colour": "blue"},
     ["unknown key 'colour'"]),
    ("negative weight", {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": -10, "canary": 10}},
     ["weights.stable", ">= 0", "-10"]),
    ("weight on a missing version", {"labels": {"stable": 1}, "weights": {"stable": 90, "7": 10}},
     ["weight key 7", "no folder"]),
    ("label to a missing version", {"labels": {"stable": 1, "canary": 9}, "weights": {"stable": 90}},
     ["label 'canary'", "version 9", "no folder"]),
    ("weight on an undefined label", {"labels": {"stable": 1}, "weights": {"stable": 90, "canary": 10}},
     ["weights.canary", "not a defined label"]),
    ("zero total", {"weights": {"1": 0, "2": 0}}, ["total must be positive"]),
    ("shadow percent over 100", {"shadow": {"target": 2, "percent": 150}}, ["shadow.percent"]),
    ("shadow target missing", {"shadow": {"target": 5, "percent": 10}}, ["shadow target 5", "no folder"]),
    ("sticky header not a header name", {"sticky": {"header": "x user"}}, ["sticky.header"]),
    ("malformed JSON", b'{"labels": {"stable": 1', ["not valid JSON"]),
    ("not an object", b"[1, 2]", ["expected a mapping"]),
]


def test_invalid_puts_are_rejected_and_change_nothing(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(COMMENTED)
    srv = serve(repo, config=cfg)
    before, raw, st = routing(srv), cfg.read_bytes(), cfg.stat()
    for what, body, fragments in BAD_PUTS:
        r = put_routing(srv, body)
        assert r.status_code == 400, (what, r.text)
        msg = r.json()["error"]
        for f in fragments:
            assert f in msg, (what, f, msg)
        assert routing(srv) == before, what
        assert cfg.read_bytes() == raw, what
        assert (cfg.stat().st_ino, cfg.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns), what


def test_put_routing_of_unknown_model_is_404(make_repo, serve, tmp_path):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(COMMENTED)
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}), config=cfg)
    raw = cfg.read_bytes()
    r = httpx.put(f"{srv.http}/v1/models/nope/routing", json={"weights": {"1": 1}})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert httpx.get(f"{srv.http}/v1/models/nope/routing").status_code == 404
    assert cfg.read_bytes() == raw


# ---- auth --------------------------------------------------------------------------
def test_state_changes_need_the_token(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(COMMENTED)
    srv = serve(repo, config=cfg, token=TOKEN)
    before, raw = routing(srv), cfg.read_bytes()  # reading needs no token
    new = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 50, "canary": 50}}

    for kwargs in ({}, {"token": "wrong"}, {"auth": f"Basic {TOKEN}"}, {"auth": TOKEN},
                   {"auth": f"Bearer {TOKEN}x"}):
        r = put_routing(srv, new, **kwargs)
        assert r.status_code == 401, (kwargs, r.text)
        assert "Bearer" in r.json()["error"]
        assert routing(srv) == before
        assert cfg.read_bytes() == raw
    # A bad body without a token is 401 too: nothing about the body is revealed first.
    assert put_routing(srv, b"{nope").status_code == 401

    for action in ("unload", "load"):
        r = httpx.post(f"{srv.http}/v2/repository/models/mlp/{action}", timeout=30)
        assert r.status_code == 401, r.text
        r = httpx.post(f"{srv.http}/v2/repository/models/mlp/{action}", timeout=30,
                       headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401, r.text
    assert srv.available("mlp") == [1, 2]
    assert set(versions_of(send(srv, 20))) <= {"1", "2"}

    r = put_routing(srv, new, token=TOKEN)
    assert r.status_code == 200, r.text
    assert routing(srv)["weights"] == {"stable": 50, "canary": 50}
    assert yaml.safe_load(cfg.read_text())["models"]["mlp"]["weights"] == {"stable": 50, "canary": 50}

    auth = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{srv.http}/v2/repository/models/mlp/unload", headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert srv.wait_for(lambda: srv.available("mlp") == [], timeout=30)
    r = httpx.post(f"{srv.http}/v2/repository/models/mlp/load", headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert srv.available("mlp") == [1, 2]
