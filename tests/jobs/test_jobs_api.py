"""The jobs API on a live in-process server: submit -> run -> result; what is refused at
submit never enters the queue; a full queue is 429; an idempotency key returns the first
job; cancel, list and paging; the token guards state changes; signed callbacks retried
until the receiver takes them; a job outlives the HTTP timeouts; retries then `failed`;
results expire."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from jobs_helpers import (BODY, SECRET, LiveServer, Receiver, job_state, settings, wait_states,
                          wait_until, write_slow_model)
from runtime.jobs.callbacks import SIGNATURE_HEADER, verify


@pytest.fixture
def live(tmp_path):
    servers = []

    def start(repo, **kw):
        token = kw.pop("token", None)
        limits = kw.pop("limits", {})
        s = settings(repo, tmp_path / "jobs.sqlite", token=token, **kw)
        for k, v in limits.items():
            setattr(s.limits, k, v)
        srv = LiveServer(s)
        servers.append(srv)
        return srv
    yield start
    for s in servers:
        s.stop()


def submit(base, model="mlp", body=None, headers=None, **extra):
    doc = dict(body or BODY)
    doc.update(extra)
    return httpx.post(f"{base}/v2/models/{model}/jobs", json=doc, headers=headers, timeout=10)


def count_jobs(base, **q) -> int:
    return len(httpx.get(f"{base}/v1/jobs", params={"limit": 500, **q}, timeout=10).json()["jobs"])


def test_job_runs_like_a_request_and_stores_its_result(make_repo, live):
    srv = live(make_repo({"mlp": {1: "st1"}}))
    r = submit(srv.http)
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["status_url"] == f"/v1/jobs/{doc['id']}" and r.headers["location"] == doc["status_url"]
    job = wait_states(srv.http, [doc["id"]])[doc["id"]]
    assert job["state"] == "succeeded" and job["attempts"] == 1 and job["version"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"] < job["expires_at"]
    sync = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY, timeout=10).json()
    np.testing.assert_allclose(job["result"]["outputs"][0]["data"], sync["outputs"][0]["data"], rtol=1e-5)
    assert job["result"]["id"] == doc["id"]  # the request id is the job id
    # counted like a request, under protocol "job", by the version that served it
    text = httpx.get(f"{srv.http}/metrics", timeout=10).text
    assert any(ln.startswith("splitserve_requests_total{") and 'protocol="job"' in ln
               and 'version="1"' in ln and 'code="OK"' in ln for ln in text.splitlines()), text[:2000]
    assert wait_until(lambda: 'splitserve_jobs{model="mlp",state="succeeded"} 1.0' in
                      httpx.get(f"{srv.http}/metrics", timeout=10).text, 10)


@pytest.mark.parametrize("body, extra, status, says", [
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}]}, {}, 400, "shape"),
    ({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}, {}, 400, "unexpected input"),
    ({"inputs": []}, {}, 400, "inputs"),
    (None, {"callback_url": "ftp://example.invalid/x"}, 400, "http://"),
    (None, {"callback_url": "/relative"}, 400, "http://"),
    (None, {"ttl_s": -1}, 400, "ttl_s"),
])
def test_bad_input_is_refused_and_never_queued(make_repo, live, body, extra, status, says):
    srv = live(make_repo({"mlp": {1: "st1"}}))
    r = submit(srv.http, body=body, **extra)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert says in msg and "\n" not in msg
    assert count_jobs(srv.http) == 0


def test_malformed_json_and_unknown_model(make_repo, live):
    srv = live(make_repo({"mlp": {1: "st1"}}))
    r = httpx.post(f"{srv.http}/v2/models/mlp/jobs", content=b"{nope", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = submit(srv.http, model="ghost")
    assert r.status_code == 404 and "ghost" in r.json()["error"]
    assert count_jobs(srv.http) == 0
    assert httpx.get(f"{srv.http}/v1/jobs/0123abcd", timeout=10).status_code == 404


def test_full_queue_idempotency_cancel_and_paging(make_repo, live):
    # nothing consumes: jobs stay queued
    srv = live(make_repo({"mlp": {1: "st1"}}), enabled=False, max_queued=3)
    ids = [submit(srv.http).json()["id"] for _ in range(2)]
    first = submit(srv.http, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    ids.append(first.json()["id"])
    full = submit(srv.http)
    assert full.status_code == 429 and full.headers["retry-after"]
    assert "jobs.max_queued" in full.json()["error"]
    again = submit(srv.http, headers={"Idempotency-Key": "k-1"})  # the first job, even when full
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert count_jobs(srv.http) == 3
    # paging: oldest first, bounded
    p1 = httpx.get(f"{srv.http}/v1/jobs", params={"model": "mlp", "state": "queued", "limit": 2}).json()
    p2 = httpx.get(f"{srv.http}/v1/jobs", params={"limit": 2, "cursor": p1["next"]}).json()
    assert [j["id"] for j in p1["jobs"] + p2["jobs"]] == ids and p2["next"] is None
    # the gauges: three queued, the oldest some time ago (refreshed off the scrape)
    def gauges():
        text = httpx.get(f"{srv.http}/metrics").text
        return ('splitserve_jobs{model="mlp",state="queued"} 3.0' in text and
                'splitserve_jobs_oldest_queued_age_seconds{model="mlp"}' in text)
    assert wait_until(gauges, 10)
    assert 'splitserve_job_submits_total{model="mlp",result="full"} 1.0' in httpx.get(f"{srv.http}/metrics").text
    assert httpx.get(f"{srv.http}/v1/jobs", params={"limit": 100000}).status_code == 400
    assert httpx.get(f"{srv.http}/v1/jobs", params={"state": "weird"}).status_code == 400
    # cancel frees a place; a cancelled job cannot be cancelled again
    c = httpx.delete(f"{srv.http}/v1/jobs/{ids[0]}")
    assert c.status_code == 200 and c.json()["state"] == "cancelled"
    assert httpx.delete(f"{srv.http}/v1/jobs/{ids[0]}").status_code == 409
    assert submit(srv.http).status_code == 202
    assert count_jobs(srv.http, state="cancelled") == 1


def test_the_token_guards_submit_and_cancel(make_repo, live):
    srv = live(make_repo({"mlp": {1: "st1"}}), token="tok", enabled=False)
    assert submit(srv.http).status_code == 401
    assert count_jobs(srv.http) == 0
    r = submit(srv.http, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 202
    jid = r.json()["id"]
    assert httpx.delete(f"{srv.http}/v1/jobs/{jid}").status_code == 401
    assert job_state(srv.http, jid)["state"] == "queued"
    assert httpx.delete(f"{srv.http}/v1/jobs/{jid}", headers={"Authorization": "Bearer tok"}).status_code == 200


def test_long_job_outlives_http_timeouts_and_calls_back_signed_on_the_third_try(tmp_path, live):
    """A forward of 1.5 s against a request timeout of 1 s: the synchronous call is cut
    (504), the job completes. Its receiver fails twice; the third POST is taken, signed."""
    repo = tmp_path / "repo"
    write_slow_model(repo, delay=1.5)
    rx = Receiver(fail_first=2)
    try:
        srv = live(repo, timeout_s=20, limits={"request_timeout_s": 1.0})
        assert httpx.post(f"{srv.http}/v2/models/slow/infer", json=BODY, timeout=10).status_code == 504
        jid = submit(srv.http, model="slow", callback_url=rx.url).json()["id"]
        job = wait_states(srv.http, [jid], timeout=30)[jid]
        assert job["state"] == "succeeded"
        assert wait_until(lambda: job_state(srv.http, jid)["callback"]["state"] == "delivered", 20)
        posts = rx.posts()
        assert len(posts) == 3
        for headers, body in posts:
            assert verify(SECRET, body, headers.get(SIGNATURE_HEADER.lower()))
            assert json.loads(body)["id"] == jid and json.loads(body)["state"] == "succeeded"
        assert [h["x-splitserve-attempt"] for h, _ in posts] == ["1", "2", "3"]
        cb = job_state(srv.http, jid)["callback"]
        assert cb["attempts"] == 3 and cb["error"] is None
        text = httpx.get(f"{srv.http}/metrics", timeout=10).text
        assert 'splitserve_job_callbacks_total{result="retry"} 2.0' in text
        assert 'splitserve_job_callbacks_total{result="ok"} 1.0' in text
    finally:
        rx.close()


def test_callback_out_of_attempts_is_failed_and_visible(make_repo, live):
    rx = Receiver(fail_first=100)
    try:
        srv = live(make_repo({"mlp": {1: "st1"}}), callback_attempts=2)
        jid = submit(srv.http, callback_url=rx.url).json()["id"]
        assert wait_until(lambda: (job_state(srv.http, jid).get("callback") or {}).get("state") == "failed", 20)
        cb = job_state(srv.http, jid)["callback"]
        assert cb["attempts"] == 2 and cb["error"] == "HTTP 500" and len(rx.posts()) == 2
        assert 'splitserve_job_callbacks_total{result="failed"} 1.0' in httpx.get(f"{srv.http}/metrics").text
    finally:
        rx.close()


def test_failing_job_is_retried_then_failed_with_the_last_reason(tmp_path, live):
    repo = tmp_path / "repo"
    write_slow_model(repo, delay=0.6)
    # the model's own timeout (jobs.models.slow.timeout_s) wins over the server's hour
    srv = live(repo, max_attempts=2, models={"slow": {"timeout_s": 0.1}})
    jid = submit(srv.http, model="slow").json()["id"]
    job = wait_states(srv.http, [jid], states=("failed",), timeout=30)[jid]
    assert job["state"] == "failed" and job["attempts"] == 2 and job["version"] == 1
    assert job["error"].startswith("attempt 2 of 2: DEADLINE_EXCEEDED")
    text = httpx.get(f"{srv.http}/metrics").text
    assert 'splitserve_job_attempts_total{model="slow",outcome="retry"} 1.0' in text
    assert 'splitserve_job_attempts_total{model="slow",outcome="failed"} 1.0' in text


def test_result_expires_after_ttl(make_repo, live):
    srv = live(make_repo({"mlp": {1: "st1"}}))
    jid = submit(srv.http, ttl_s=0.5).json()["id"]
    job = wait_states(srv.http, [jid], states=("succeeded", "expired"))[jid]
    assert job["state"] in ("succeeded", "expired")
    assert wait_until(lambda: job_state(srv.http, jid)["state"] == "expired", 15)
    assert "result" not in job_state(srv.http, jid)


def test_jobs_yield_to_synchronous_requests(tmp_path, live):
    """While `jobs.yield_to_sync` synchronous requests are in flight no job starts; once
    they are answered the jobs run."""
    import threading
    repo = tmp_path / "repo"
    hold = tmp_path / "hold"
    hold.touch()
    write_slow_model(repo, delay=0.0, hold=hold)
    srv = live(repo, yield_to_sync=1)
    answers = []
    t = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{srv.http}/v2/models/slow/infer", json=BODY, timeout=30).status_code))
    t.start()
    try:
        # read on the loop, polled (the manager's wait_until wakes on its own events only)
        assert wait_until(lambda: srv.on_loop(lambda: srv.core.inference.inflight) == 1, 10)
        ids = [submit(srv.http, model="slow").json()["id"] for _ in range(2)]
        seen = srv.on_loop(lambda: srv.core.jobs.yielded)
        assert wait_until(lambda: srv.on_loop(lambda: srv.core.jobs.yielded) >= seen + 20, 10)
        assert {job_state(srv.http, i)["state"] for i in ids} == {"queued"}
    finally:
        hold.unlink()
        t.join(30)
    assert answers == [200]
    final = wait_states(srv.http, ids, timeout=20)
    assert all(final[i]["state"] == "succeeded" for i in ids)


def test_graceful_stop_gives_running_jobs_back_uncounted(tmp_path, live):
    """SIGTERM-style stop while a job is inside its forward: the job goes back to
    `queued` with its attempt not counted; the next server runs it (attempt 1)."""
    import sqlite3
    import threading
    repo = tmp_path / "repo"
    hold = tmp_path / "hold"
    hold.touch()
    write_slow_model(repo, delay=0.0, hold=hold)
    srv = live(repo)
    jid = submit(srv.http, model="slow").json()["id"]
    assert wait_until(lambda: job_state(srv.http, jid)["state"] == "running", 20)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    db = tmp_path / "jobs.sqlite"

    def row():
        with sqlite3.connect(db) as c:
            return c.execute("SELECT state, attempts FROM jobs WHERE id=?", (jid,)).fetchone()
    try:
        assert wait_until(lambda: row() == ("queued", 0), 20), row()
    finally:
        hold.unlink()  # the forward thread finishes; the stop completes
        stopper.join(60)
    again = live(repo)
    job = wait_states(again.http, [jid], timeout=30)[jid]
    assert job["state"] == "succeeded" and job["attempts"] == 1


def test_unreachable_store_is_503_and_sync_serving_goes_on(make_repo, live, tmp_path):
    pytest.importorskip("redis")
    srv = live(make_repo({"mlp": {1: "st1"}}), url=f"unix://{tmp_path}/no-such.sock")
    assert httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY, timeout=10).status_code == 200
    r = submit(srv.http)
    assert r.status_code == 503 and "jobs store (redis) cannot be reached" in r.json()["error"]
    assert "\n" not in r.json()["error"]
    assert httpx.get(f"{srv.http}/v1/jobs/abcd", timeout=10).status_code == 503


def test_a_job_is_routed_like_a_request_by_its_sticky_key(make_repo, tmp_path):
    """Sticky routing: a job submitted with a user's header runs on the version that
    user's synchronous requests get, for every user."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n"
                   "    weights: {stable: 50, canary: 50}\n    sticky: {header: x-user-id}\n")
    s = settings(make_repo({"mlp": {1: "st1", 2: "st2"}}), tmp_path / "jobs.sqlite")
    s.config_path = cfg
    srv = LiveServer(s)
    try:
        users = [f"user-{i}" for i in range(12)]
        sync = {u: httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY, timeout=10,
                              headers={"x-user-id": u}).headers["x-model-version"] for u in users}
        assert set(sync.values()) == {"1", "2"}  # both arms drawn among these users
        ids = {u: submit(srv.http, headers={"x-user-id": u}).json()["id"] for u in users}
        final = wait_states(srv.http, list(ids.values()), timeout=30)
        assert {u: str(final[ids[u]]["version"]) for u in users} == sync
    finally:
        srv.stop()


def test_a_models_own_concurrency_caps_its_running_jobs(tmp_path, live):
    repo = tmp_path / "repo"
    hold = tmp_path / "hold"
    hold.touch()
    write_slow_model(repo, delay=0.0, hold=hold)
    srv = live(repo, concurrency=3, models={"slow": {"concurrency": 1}})
    try:
        ids = [submit(srv.http, model="slow").json()["id"] for _ in range(3)]
        assert wait_until(lambda: [job_state(srv.http, i)["state"] for i in ids].count("running") == 1, 20)
        seen = srv.on_loop(lambda: srv.core.jobs.claims)
        assert wait_until(lambda: srv.on_loop(lambda: srv.core.jobs.claims) >= seen + 10, 10)  # polled on
        assert sorted(job_state(srv.http, i)["state"] for i in ids) == ["queued", "queued", "running"]
    finally:
        hold.unlink()
    final = wait_states(srv.http, ids, timeout=30)
    assert all(final[i]["state"] == "succeeded" for i in ids)
