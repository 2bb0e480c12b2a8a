"""Server-wide readiness with `splitserve serve --workers 2`: one worker loads 4 s longer
than the other (its model.py sleeps once). Probed from the start on fresh connections:
no predict that gets an answer fails (a loading worker is not on the port yet), and
readiness turns 200 once, when both have loaded, never a 200 then a 503 (the other
worker, still loading, answered 503 before the fix)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from serverproc import ServerProcess, free_port

pytestmark = pytest.mark.slow

SLOW_ONCE = '''

import os as _os
import time as _time

_build = build_model


def build_model(**kwargs):
    """The first worker to get here loads 4 s longer: the workers finish apart."""
    try:
        _os.close(_os.open(_os.path.join(_os.path.dirname(__file__), ".slow-claimed"),
                           _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY))
        _time.sleep(4)
    except FileExistsError:
        pass
    return _build(**kwargs)
'''
BODY = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [' + b",".join([b"0.1"] * 64) + b"]}]}"


def status(req) -> int | None:
    """The status of one request on a fresh connection, or None when nothing listens."""
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


def test_ready_only_when_every_worker_is_and_no_connection_reaches_a_loading_one(make_repo, tmp_path):
    from runtime.workers import child, supervisor
    assert child.ALL_READY == supervisor.ALL_READY

    repo = make_repo({"mlp": {1: "st1"}})
    with open(repo / "mlp" / "model.py", "a", encoding="utf-8") as f:
        f.write(SLOW_ONCE)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    srv = ServerProcess(repo, "--workers", "2", "--http-port", str(port), cwd=tmp_path)
    ready, infer = [], []
    try:
        deadline = time.monotonic() + 240
        while not srv.serving or len(ready) < 20 or ready[-20:].count(200) < 20:
            assert time.monotonic() < deadline and srv.alive(), srv.log_text(40)
            ready.append(status(f"{base}/v2/health/ready"))
            infer.append(status(urllib.request.Request(f"{base}/v2/models/mlp/infer", data=BODY,
                                                       headers={"content-type": "application/json"})))
            time.sleep(0.02)  # probing a child process's port: there is no event to wait on
    finally:
        srv.stop(60)
    answered = [s for s in infer if s is not None]
    assert answered and set(answered) == {200}, infer  # never a 503/404 from a loading worker
    first = ready.index(200)
    assert set(ready[first:]) == {200}, ready  # never 200, then 503 from the other worker
    # The slow worker's 4 s: the fast one served predicts while the server was not yet ready.
    assert any(r == 503 and i == 200 for r, i in zip(ready[:first], infer[:first])), (ready, infer)
