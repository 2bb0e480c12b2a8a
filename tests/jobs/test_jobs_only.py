"""`splitserve serve --jobs-only`: a worker for a separate pool. It answers health,
metrics and the jobs API, has no inference API and no gRPC listener, and runs the jobs a
front server queued in the same store."""

from __future__ import annotations

import httpx
import pytest

from jobs_helpers import BODY, ServerProcess, wait_states

pytestmark = pytest.mark.slow


def test_jobs_only_worker_runs_what_the_front_queued(make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(f"jobs:\n  path: {tmp_path / 'jobs.sqlite'}\n  poll_s: 0.05\n")
    front_cfg = tmp_path / "front.yaml"  # the front consumes nothing: same store, enabled off
    front_cfg.write_text(f"jobs:\n  path: {tmp_path / 'jobs.sqlite'}\n  enabled: false\n")
    worker = ServerProcess(repo, "--jobs-only", config=cfg, name="worker")
    front = ServerProcess(repo, config=front_cfg, name="front")
    try:
        worker.wait_ready()
        front.wait_ready()
        assert worker.grpc_port is None
        w = worker.url
        assert httpx.get(f"{w}/v2/health/live").status_code == 200
        assert httpx.post(f"{w}/v2/models/mlp/infer", json=BODY).status_code == 404
        assert httpx.get(f"{w}/v2/models/mlp").status_code == 404
        ids = [httpx.post(f"{front.url}/v2/models/mlp/jobs", json=BODY).json()["id"] for _ in range(5)]
        final = wait_states(front.url, ids, timeout=30)
        assert all(final[i]["state"] == "succeeded" for i in ids)
        assert "event=job_finished" in worker.log_text() and "event=job_finished" not in front.log_text()
        assert "splitserve_job_attempts_total" in httpx.get(f"{w}/metrics").text
    finally:
        worker.stop(timeout=20)
        front.stop(timeout=20)
