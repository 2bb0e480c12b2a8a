"""A live server on an s3:// repository (moto on loopback): publish, upload file by file,
delete, fail, and the LIST budget, with real clients and zero failed requests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import torch

from conftest import expected_output, wait_until
from s3fixtures import bucket, publish, s3_server  # noqa: F401 - fixtures
from runtime.config.settings import StoreSettings
from runtime.types import VersionState

ROOT = Path(__file__).resolve().parents[2]
X = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": X.ravel().tolist()}]}


def store(tmp_path, **kw) -> StoreSettings:
    return StoreSettings(**{"cache_dir": tmp_path / "cache", "quiet_s": 0.5, "poll_interval_s": 0.1,
                            "max_lists_per_minute": 6000, **kw})


class Hammer:
    """Sends requests back to back from a thread; keeps (status, served version, output)."""

    def __init__(self, url: str):
        self.url, self.results, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"{self.url}/v2/models/mlp/infer", json=BODY)
                    out = r.json()["outputs"][0]["data"] if r.status_code == 200 else r.text
                    self.results.append((r.status_code, r.headers.get("x-model-version"), out))
                except httpx.HTTPError as e:
                    self.results.append((0, None, repr(e)))

    def served(self, version: str) -> int:
        return sum(1 for s, v, _ in list(self.results) if s == 200 and v == version)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def record_loads(srv) -> list:
    """Every "loaded" lifecycle event: (version, files in its folder at load time)."""
    loads, m = [], srv.core.manager
    inner = m.on_event

    def on_event(ev):
        if ev.kind == "loaded":
            folder = srv.core.root / ev.model / str(ev.version)
            loads.append((ev.version, sorted(p.name for p in folder.iterdir())))
        inner(ev)
    m.on_event = on_event
    return loads


def test_publish_upload_file_by_file_and_delete_with_zero_failed_requests(
        bucket, publish, serve, tmp_path, version_cache):
    publish("mlp", 1, "st1")
    # quiet_s: longer than the gap between two back-to-back uploads on a loaded machine
    srv = serve(tmp_path / "unused", url=bucket.url(), store=store(tmp_path, quiet_s=1.5))
    assert srv.available("mlp") == [1]
    mirror, cache = srv.core.mirror, srv.core.root
    loads = record_loads(srv)
    with Hammer(srv.http) as h:
        assert wait_until(lambda: h.served("1") >= 5)
        # Version 2, file by file. First a file that is not a model: the listing goes quiet
        # (longer than quiet_s) while the version is incomplete, so nothing is loaded.
        bucket.put("models/mlp/2/notes.txt", b"uploading version 2")
        assert wait_until(lambda: mirror.figures.versions["incomplete"] == 1, 20)
        assert srv.core.manager.state_of("mlp", 2) is None and not (cache / "mlp" / "2").exists()
        # The model file, then one more file within quiet_s: mirrored once, with both.
        bucket.put("models/mlp/2/model.safetensors", version_cache / "st2" / "model.safetensors")
        bucket.put("models/mlp/2/config.json", b"{}")
        assert srv.wait_state("mlp", 2, VersionState.AVAILABLE, 60)
        assert wait_until(lambda: srv.available("mlp") == [2], 30)
        assert wait_until(lambda: h.served("2") >= 5)
        assert loads == [(2, ["config.json", "model.safetensors", "notes.txt"])]
        # Deleting version 2 in the store: version 1 comes back first, then 2 drains.
        bucket.delete_prefix("models/mlp/2/")
        assert wait_until(lambda: srv.available("mlp") == [1], 60)
        n1 = h.served("1")
        assert wait_until(lambda: h.served("1") >= n1 + 5)
    assert not (cache / "mlp" / "2").exists()
    failures = [r for r in h.results if r[0] != 200]
    assert failures == [] and len(h.results) > 20
    for version in ("1", "2"):
        out = next(o for s, v, o in h.results if v == version)
        np.testing.assert_allclose(np.array(out, dtype=np.float32).reshape(2, 8),
                                   expected_output(int(version), torch.from_numpy(X)).numpy(),
                                   rtol=1e-5, atol=1e-6)
    text = httpx.get(f"{srv.http}/metrics").text
    fam = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
           if line.startswith("splitserve_store_")}
    assert fam["splitserve_store_up"] == 1
    assert fam["splitserve_store_objects_fetched_total"] == 6  # model.py, model.yaml, 1 file, 3 files of 2
    assert fam["splitserve_store_bytes_fetched_total"] > 2 * (version_cache / "st1/model.safetensors").stat().st_size
    assert fam["splitserve_store_last_success_timestamp_seconds"] > 0
    assert "splitserve_store_sync_duration_seconds" in fam
    assert fam['splitserve_store_errors_total{op="list"}'] == 0


def test_a_store_failure_during_serving_keeps_the_last_good_versions(bucket, publish, serve, tmp_path, s3_server):
    publish("mlp", 1, "st1")
    srv = serve(tmp_path / "unused", url=bucket.url(), store=store(tmp_path))
    mirror = srv.core.mirror
    s3_server.enforce_auth(True)  # the server's key is no longer valid: every listing fails
    assert wait_until(lambda: mirror.figures.errors["list"] >= 3, 30)
    r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    text = httpx.get(f"{srv.http}/metrics").text
    assert "splitserve_store_up 0.0" in text
    assert (srv.core.root / "mlp" / "1" / "model.safetensors").is_file() and srv.available("mlp") == [1]
    s3_server.enforce_auth(False)
    assert wait_until(lambda: mirror.figures.up == 1, 30)
    assert srv.available("mlp") == [1]


def test_list_requests_stay_within_the_configured_rate(bucket, publish, serve, tmp_path, s3_server):
    import time
    publish("mlp", 1, "st1")
    t0 = time.monotonic()
    # The poller would list every 50 ms; the limit allows 4 LIST requests in any minute.
    srv = serve(tmp_path / "unused", url=bucket.url(),
                store=store(tmp_path, quiet_s=0.0, poll_interval_s=0.05, max_lists_per_minute=4))
    assert srv.available("mlp") == [1]
    assert wait_until(lambda: s3_server.lists_since(t0) >= 4, 20)
    assert not wait_until(lambda: s3_server.lists_since(t0) > 4, 3)  # for the rest of the minute
    assert s3_server.lists_since(t0) == 4
    assert "splitserve_store_list_requests_total 4.0" in httpx.get(f"{srv.http}/metrics").text


def test_a_missing_bucket_at_start_is_a_clear_error_and_nothing_is_served(bucket, tmp_path):
    import asyncio

    import pytest

    from runtime.service.core import Core
    from runtime.repository.objectstore import StoreError
    from runtime.config.settings import Settings
    s = Settings()
    s.repository.url = "s3://no-such-bucket-here/models"
    s.repository.store = store(tmp_path)
    core = Core(s)
    with pytest.raises(StoreError) as e:
        asyncio.run(core.start())
    assert str(e.value) == ("s3://no-such-bucket-here/models: listing failed: NoSuchBucket: "
                            "The specified bucket does not exist (HTTP 404 Not Found)")
    assert not core.started and core.manager.models == {}


def test_wrong_credentials_at_start_exit_2_with_one_line(bucket, publish, tmp_path, s3_server):
    publish("mlp", 1, "st1")
    s3_server.enforce_auth(True)  # the key in the environment is unknown to the store
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run([sys.executable, "-m", "runtime", "serve", "--repository", bucket.url(),
                        "--http-port", "0", "--grpc-port", "0", "--config", "/dev/null"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2
    starting = [ln for ln in r.stderr.splitlines() if "event=starting" in ln]
    assert len(starting) == 1 and f" repository={bucket.url()} " in starting[0], r.stderr  # not ./model_repository
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("splitserve:")] == [
        f"splitserve: model repository: {bucket.url()}: listing failed: InvalidAccessKeyId: The AWS "
        "Access Key Id you provided does not exist in our records. (HTTP 403 Forbidden)"]
    assert not list((tmp_path / "xdg" / "splitserve" / "mirror").glob("*/mlp"))
