"""Scenario 4: config faults.

The routing config file is hot-reloaded. Invalid YAML, weights pointing at a missing
version, negative weights, labels pointing nowhere, a config file deleted: each is
rejected with a reason in the log, the last good config stays in force (GET routing
unchanged, traffic split unchanged), and a valid edit afterwards still applies. The same
faults through PUT /v1/models/mlp/routing get a 400 and leave the file byte for byte.
Nothing is persisted half-written: a writer process killed (SIGKILL) at random moments
while persisting leaves a file that parses as one of the valid states.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
import yaml

from reliability_helpers import BODY, MLP_YAML, ROOT, LogCapture, wait_until

GOOD = """# routing for the reliability tests
models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 50, canary: 50}
"""

FAULTS = [
    ("invalid-yaml", "models:\n  mlp: {labels: [stable\n", "not valid YAML"),
    ("not-a-mapping", "- one\n- two\n", "expected a mapping"),
    ("weights-missing-version", "models:\n  mlp:\n    weights: {3: 100}\n",
     "points at version 3, which has no folder"),
    ("negative-weights", "models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n"
                         "    weights: {stable: -10, canary: 110}\n", "finite number >= 0"),
    ("zero-total", "models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n"
                   "    weights: {stable: 0, canary: 0}\n", "total must be positive"),
    ("label-nowhere", "models:\n  mlp:\n    labels: {stable: 1, canary: 7}\n"
                      "    weights: {stable: 50, canary: 50}\n", "version 7"),
    ("undefined-label", "models:\n  mlp:\n    labels: {stable: 1}\n    weights: {ghost: 100}\n",
     "'ghost' is not a defined label"),
    ("unknown-key", "models:\n  mlp:\n    wieghts: {1: 100}\n", "unknown key 'wieghts'"),
    ("deleted", None, "no such routing config file"),
]


def routing(srv) -> dict:
    r = httpx.get(f"{srv.http}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def traffic(srv, n: int = 60) -> Counter:
    with httpx.Client(base_url=srv.http, timeout=30) as c:
        out = Counter()
        for _ in range(n):
            r = c.post("/v2/models/mlp/infer", json=BODY)
            assert r.status_code == 200, r.text
            out[int(r.json()["model_version"])] += 1
    return out


def count_reloads(srv) -> list[bool]:
    """Results of every config-file reload the watcher triggers from now on, so a test
    waits for "the file was re-read" instead of sleeping and asserting nothing happened."""
    ctl = srv.core.control
    inner = ctl.reload_config_file
    results: list[bool] = []

    def reload(*args, **kwargs) -> bool:
        changed = inner(*args, **kwargs)
        results.append(changed)
        return changed

    ctl.reload_config_file = reload  # looked up when the debounce timer is armed
    return results


@pytest.fixture
def routed(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": MLP_YAML})
    cfg = tmp_path / "conf" / "splitserve.yaml"
    cfg.parent.mkdir()
    cfg.write_text(GOOD)
    srv = serve(repo, config=cfg, quiet_s=0.2)
    assert srv.available("mlp") == [1, 2]
    return srv, cfg


@pytest.mark.slow
def test_bad_config_edits_are_rejected_and_last_good_kept(routed):
    srv, cfg = routed
    before = routing(srv)
    assert before["weights"] == {"stable": 50, "canary": 50}
    base_traffic = traffic(srv)
    assert set(base_traffic) == {1, 2}
    reloads = count_reloads(srv)
    with LogCapture("splitserve.control") as logs:
        for name, text, reason in FAULTS:
            n = len(logs.records)
            if text is None:
                cfg.unlink()
            else:
                cfg.write_text(text)
            assert wait_until(lambda: any("config_rejected" in m for m in logs.messages()[n:]), 10), \
                f"{name}: no rejection logged; log: {logs.messages()[n:]}"
            msg = next(m for m in logs.messages()[n:] if "config_rejected" in m)
            assert "keeping=last_good" in msg and reason in msg, f"{name}: {msg}"
            assert routing(srv) == before, name
            seen = traffic(srv, 30)
            assert set(seen) == {1, 2}, f"{name}: traffic changed to {seen}"
            print(f"  {name}: rejected, traffic {dict(seen)}; {msg[:140]}")
            if text is None:
                n = len(reloads)
                cfg.write_text(GOOD)  # back for the next fault; no change, so nothing logged
                assert wait_until(lambda: len(reloads) > n, 10), "the file watcher never reloaded"
                assert reloads[n:] == [False] * len(reloads[n:]), reloads  # reloaded: no change
        assert not any("config_applied" in m for m in logs.messages())
        # the watcher still works: a valid edit applies
        cfg.write_text(GOOD.replace("stable: 50, canary: 50", "stable: 100, canary: 0"))
        assert wait_until(lambda: routing(srv)["weights"] == {"stable": 100, "canary": 0}, 10)
        assert traffic(srv, 30) == Counter({1: 30})
        assert any("config_applied" in m for m in logs.messages())


PUT_FAULTS = [
    (b'{"weights": {"3": 100}}', "points at version 3"),
    (b'{"labels": {"stable": 1, "canary": 2}, "weights": {"stable": -1, "canary": 2}}', ">= 0"),
    (b'{"labels": {"stable": 1, "canary": 7}}', "version 7"),
    (b'{"weights": {"ghost": 1}}', "not a defined label"),
    (b'{"weights": {"stable": 1}', "not valid JSON"),
    (b'[1, 2]', "expected a mapping"),
    (b'{"weights": {"1": NaN}}', "not valid JSON"),
    (b'{"weights": {"1": 1e999}}', "infinity"),
    (b'{"shadow": {"target": 9, "percent": 10}}', "version 9"),
    (b'{"shadow": {"target": 2, "percent": 101}}', "0 to 100"),
]


def test_bad_routing_puts_are_rejected_and_nothing_persisted(routed):
    srv, cfg = routed
    before, raw = routing(srv), cfg.read_bytes()
    mtime = cfg.stat().st_mtime_ns
    for body, reason in PUT_FAULTS:
        r = httpx.put(f"{srv.http}/v1/models/mlp/routing", content=body, timeout=10,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, f"{body!r}: {r.status_code} {r.text}"
        assert reason in r.json()["error"], f"{body!r}: {r.json()['error']}"
        assert routing(srv) == before
    assert cfg.read_bytes() == raw and cfg.stat().st_mtime_ns == mtime
    assert set(traffic(srv, 40)) == {1, 2}
    # a good PUT is persisted whole, comments kept
    r = httpx.put(f"{srv.http}/v1/models/mlp/routing", timeout=10,
                  json={"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 0, "canary": 1}})
    assert r.status_code == 200, r.text
    text = cfg.read_text()
    assert text.startswith("# routing for the reliability tests")
    assert yaml.safe_load(text)["models"]["mlp"]["weights"] == {"stable": 0, "canary": 1}
    assert traffic(srv, 20) == Counter({2: 20})


WRITER = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
from router import RouteConfig, persist_config_file
states = [RouteConfig.from_json(s) for s in json.loads(sys.argv[2])]
print("ready", flush=True)
i = 0
while True:
    persist_config_file(sys.argv[1], "mlp", states[i % len(states)])
    i += 1
    print(i, flush=True)
"""

STATES = [
    {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10}},
    {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 10, "canary": 90},
     "sticky": {"header": "x-user-id"}},
    {"labels": {"stable": 2}, "weights": {"2": 1, "1": 3}, "shadow": {"target": 1, "percent": 5}},
]


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_a_valid_file(tmp_path):
    from router import RouteConfig, load_config_file

    cfg = tmp_path / "splitserve.yaml"
    # a large file, so that a write takes long enough to be hit by the kill now and then
    others = "".join(f"  model{i}:\n    labels: {{a: {i + 1}}}\n    weights: {{a: 1}}\n"
                     for i in range(60))
    cfg.write_text("# top comment\nserver:\n  host: 127.0.0.1\nmodels:\n"
                   "  mlp:\n    weights: {1: 100}\n" + others)
    initial = load_config_file(cfg)
    valid_mlp = [initial["mlp"]] + [RouteConfig.from_json(s) for s in STATES]
    rng = random.Random(7)
    writes, kills, leftovers = [], 0, 0
    t_end = time.monotonic() + 60  # a bound for a loaded machine; 15 kills take ~10 s
    while kills < 15 and time.monotonic() < t_end:
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(cfg), json.dumps(STATES), str(ROOT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        try:
            assert p.stdout.readline().strip() == b"ready", p.stderr.read().decode()
            # Kill at a random moment of the write stream: after its first complete write
            # (a state, so a slow machine cannot turn this into "killed before writing").
            assert p.stdout.readline().strip() == b"1", p.stderr.read().decode()
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(p.pid, signal.SIGKILL)
            out, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        kills += 1
        lines = out.split()
        writes.append(int(lines[-1]) if lines else 1)  # the first was read above
        loaded = load_config_file(cfg)  # always parses, always validates
        assert loaded["mlp"] in valid_mlp, loaded["mlp"]
        assert len(loaded) == 61 and loaded["model59"] == initial["model59"]
        doc = yaml.safe_load(cfg.read_text())
        assert doc["server"] == {"host": "127.0.0.1"}
        assert cfg.read_text().startswith("# top comment")
        stale = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        leftovers = len(stale)
    print(f"\n  writer killed {kills} times after {sum(writes)} completed writes "
          f"(per run: {writes}); file valid every time; temp files left behind: {leftovers}")
    assert kills >= 8 and sum(writes) > 0
