"""Two server processes sharing one real redis-server: 200 jobs, submitted to
both, each run once (one attempt, one stored result), by both servers, and split between
the two versions as the weights say (chi-square, 1 degree of freedom, p = 0.001)."""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest

from jobs_helpers import BODY, RedisServer, ServerProcess, wait_until

pytestmark = pytest.mark.slow
N = 200
CHI2_CRIT_DF1_P001 = 10.828
CONFIG = """models:
  mlp:
    labels: {{stable: 1, canary: 2}}
    weights: {{stable: 70, canary: 30}}
jobs:
  url: {url}
  poll_s: 0.05
  concurrency: 4
  lease_s: 10
"""


def test_two_servers_one_redis_each_job_once_split_by_weights(make_repo, tmp_path):
    redis = RedisServer(tmp_path / "redis")
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG.format(url=redis.url))
    servers = [ServerProcess(repo, config=cfg, name=f"s{i}") for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        ids = []
        with httpx.Client(timeout=10) as c:
            for i in range(N):
                r = c.post(f"{servers[i % 2].url}/v2/models/mlp/jobs", json=BODY)
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])

            def done():
                page = c.get(f"{servers[0].url}/v1/jobs",
                             params={"model": "mlp", "state": "succeeded", "limit": 500}).json()
                return len(page["jobs"]) == N
            assert wait_until(done, 90, 0.5)
            jobs = [c.get(f"{servers[1].url}/v1/jobs/{i}").json() for i in ids]
        assert all(j["state"] == "succeeded" and j["attempts"] == 1 for j in jobs)
        # each stored once, and both servers worked
        stored = Counter()
        by_server = Counter()
        for s in servers:
            for ln in s.lines():
                m = re.search(r"event=job_finished id=(\w+) .*stored=True", ln)
                if m:
                    stored[m.group(1)] += 1
                    by_server[s.name] += 1
        assert stored == Counter({i: 1 for i in ids})
        assert set(by_server) == {"s0", "s1"}, by_server
        versions = Counter(j["version"] for j in jobs)
        e1, e2 = 0.7 * N, 0.3 * N
        chi2 = (versions[1] - e1) ** 2 / e1 + (versions[2] - e2) ** 2 / e2
        assert set(versions) == {1, 2} and chi2 < CHI2_CRIT_DF1_P001, (versions, chi2)
        # the answers are the serving version's
        assert all(j["result"]["model_version"] == str(j["version"]) for j in jobs)
    finally:
        for s in servers:
            s.stop(timeout=20)
        redis.stop()
