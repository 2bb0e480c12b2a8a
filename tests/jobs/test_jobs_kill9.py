"""kill -9 of the server while jobs run, on each backend (SQLite; Redis Streams, where the
new server's XAUTOCLAIM takes the dead consumer's entries): after a restart on the same
queue every job reaches `succeeded`, none is lost, each result is stored once and each
callback is made once. The model is gated by a file: the test kills the server while two
jobs are inside their forward and no callback can be in flight."""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest

from jobs_helpers import (BODY, SECRET, RedisServer, Receiver, ServerProcess, wait_states, wait_until,
                          write_slow_model)
from runtime.jobs.callbacks import verify

pytestmark = pytest.mark.slow

CONFIG = """jobs:
  {where}
  lease_s: 1.0
  poll_s: 0.05
  concurrency: 2
  max_attempts: 4
  backoff_s: 0.05
  callback_secret: {secret}
  callback_backoff_s: 0.05
"""


def states(url: str) -> dict[str, str]:
    page = httpx.get(f"{url}/v1/jobs", params={"limit": 500}, timeout=10).json()
    return {j["id"]: j["state"] for j in page["jobs"]}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_kill9_while_jobs_run_then_restart_finishes_every_job_once(tmp_path, backend):
    repo = tmp_path / "repo"
    hold = tmp_path / "hold"
    write_slow_model(repo, delay=0.05, versions=(1, 2), hold=hold)
    redis = RedisServer(tmp_path / "redis") if backend == "redis" else None
    where = f"url: {redis.url}" if redis else f"path: {tmp_path / 'jobs.sqlite'}"
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG.format(where=where, secret=SECRET))
    rx = Receiver()
    servers = []
    try:
        first = ServerProcess(repo, config=cfg, name="first")
        servers.append(first)
        first.wait_ready()
        url = first.url

        def submit():
            r = httpx.post(f"{url}/v2/models/slow/jobs", json={**BODY, "callback_url": rx.url}, timeout=10)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        early = [submit() for _ in range(3)]
        wait_states(url, early, timeout=30)
        assert wait_until(lambda: len(rx.posts()) == 3, 20)
        hold.touch()  # from now on every forward waits: two jobs get stuck inside it
        late = [submit() for _ in range(9)]
        # held: the two running cannot finish, the queued cannot start (both slots busy)
        assert wait_until(lambda: Counter(states(url).values())["running"] == 2, 20), states(url)
        at_kill = states(url)
        first.kill()  # SIGKILL: no drain, no give-back; the two leases just stop
        assert Counter(at_kill.values()) == Counter(succeeded=3, running=2, queued=7)
        running_at_kill = {i for i, s in at_kill.items() if s == "running"}
        hold.unlink()
        second = ServerProcess(repo, config=cfg, name="second")
        servers.append(second)
        second.wait_ready()
        ids = early + late
        final = wait_states(second.url, ids, timeout=60)
        assert all(final[i]["state"] == "succeeded" for i in ids), final
        assert all(final[i]["result"]["outputs"][0]["shape"] == [2, 8] for i in ids)
        assert {i for i in ids if final[i]["attempts"] == 2} == running_at_kill
        assert all(final[i]["attempts"] == 1 for i in set(ids) - running_at_kill)
        # each result stored once: exactly one stored=True finish line per job, both logs
        stored = Counter(m.group(1) for s in servers for ln in s.lines()
                         for m in [re.search(r"event=job_finished id=(\w+) .*stored=True", ln)] if m)
        assert stored == Counter({i: 1 for i in ids})
        # each callback once, signed
        assert wait_until(lambda: len(rx.posts()) >= len(ids), 20)
        posts = rx.posts()
        assert Counter(h["x-splitserve-job"] for h, _ in posts) == Counter({i: 1 for i in ids})
        assert all(verify(SECRET, b, h["x-splitserve-signature"]) for h, b in posts)
    finally:
        if hold.exists():
            hold.unlink()
        for s in servers:
            s.stop(timeout=20)
        rx.close()
        if redis is not None:
            redis.stop()
