"""Routing across real server processes (`python -m runtime serve`): split shares over
10,000 requests, and sticky assignment that two independent processes agree on.

Each server is a child process started by tools/serverproc.py on OS-chosen ports; the
ports are read from its `event=serving` log line, so none is guessed or taken meanwhile.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson

from router.assign import stable_unit
from serverproc import ServerProcess

BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                  "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]})
JSON = {"content-type": "application/json"}

# Chi-square critical value at p = 0.001 for 1 degree of freedom (two versions).
CHI2_CRIT_DF1_P001 = 10.828


def server(repo: Path, config: Path, hash_seed: int | None = None) -> ServerProcess:
    """A `python -m runtime serve` child; its own hash seed when given (str hash() of a
    key then differs between the processes)."""
    env = {} if hash_seed is None else {"PYTHONHASHSEED": str(hash_seed)}
    return ServerProcess(repo, config=config, env=env)


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "splitserve.yaml"
    p.write_text(text)
    return p


def _versions(url: str, n: int, threads: int = 8, keys: list[str] | None = None) -> list[tuple[str, str]]:
    """(x-model-version, x-route) of n requests (one per key when keys are given)."""
    items = keys if keys is not None else [None] * n
    chunks = [items[i::threads] for i in range(threads)]

    def run(chunk):
        out = []
        with httpx.Client(base_url=url, timeout=30) as c:
            for key in chunk:
                headers = JSON if key is None else {**JSON, "x-user-id": key}
                r = c.post("/v2/models/mlp/infer", content=BODY, headers=headers)
                assert r.status_code == 200, r.text
                out.append((key, r.headers["x-model-version"], r.headers["x-route"]))
        return out

    with ThreadPoolExecutor(threads) as pool:
        results = [x for part in pool.map(run, chunks) for x in part]
    if keys is None:
        return [(v, how) for _, v, how in results]
    by_key = {k: (v, how) for k, v, how in results}
    return [by_key[k] for k in keys]


def test_split_shares_match_weights_chi_square(make_repo, tmp_path):
    """10,000 unkeyed requests on a 90/10 split: observed counts pass a chi-square test."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = _config(tmp_path, "models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n"
                            "    weights: {stable: 90, canary: 10}\n")
    srv = server(repo, cfg)
    try:
        srv.wait_ready()
        got = _versions(srv.url, 10_000)
    finally:
        code = srv.stop()
    assert code == 0, srv.log_text(40)  # SIGTERM is a graceful stop
    assert {how for _, how in got} == {"split"}
    n1 = sum(v == "1" for v, _ in got)
    n2 = sum(v == "2" for v, _ in got)
    assert n1 + n2 == 10_000
    e1, e2 = 9_000.0, 1_000.0
    chi2 = (n1 - e1) ** 2 / e1 + (n2 - e2) ** 2 / e2
    assert chi2 < CHI2_CRIT_DF1_P001, f"counts {n1}/{n2} vs 9000/1000: chi2 = {chi2:.2f}"


def test_sticky_assignment_agrees_across_two_processes(make_repo, tmp_path):
    """Two independent server processes (each its own hash seed) send every user to the
    same version, and that version is the one the stable hash puts the user in."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = _config(tmp_path, "models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n"
                            "    weights: {stable: 90, canary: 10}\n    sticky: {header: x-user-id}\n")
    users = [f"user-{i}" for i in range(500)]
    # Both start at once, with different hash seeds: Python's hash() of a key differs.
    a, b = server(repo, cfg, hash_seed=1), server(repo, cfg, hash_seed=2)
    try:
        a.wait_ready()
        b.wait_ready()
        got_a = _versions(a.url, 0, keys=users)
        got_b = _versions(b.url, 0, keys=users)
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), a.log_text(20) + b.log_text(20)
    assert {how for _, how in got_a + got_b} == {"sticky"}
    assert got_a == got_b
    expected = [("1" if stable_unit("mlp", u) < 0.9 else "2", "sticky") for u in users]
    assert got_a == expected
    canary = sum(v == "2" for v, _ in got_a)
    assert 20 <= canary <= 85, canary  # ~10% of 500 (binomial sd ~6.7)
