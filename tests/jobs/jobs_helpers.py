"""Shared by the jobs tests: the root conftest and the reliability helpers loaded by path
(under their own module names), a live server with a `jobs:` block, and a callback
receiver (a real HTTP server on loopback that records what it got)."""

from __future__ import annotations

import http.server
import importlib.util
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


_c = _load("_splitserve_root_conftest", ROOT / "tests" / "conftest.py")
_r = _load("reliability_helpers", ROOT / "tests" / "reliability" / "reliability_helpers.py")
LiveServer = _c.LiveServer
wait_until = _c.wait_until
BODY = _r.BODY
X = _r.X
write_slow_model = _r.write_slow_model
write_linear_weights = _r.write_linear_weights
ServerProcess = _r.ServerProcess
SECRET = "s3cret-for-tests"


def settings(repo: Path, jobs_path: Path, token: str | None = None, **jobs):
    from runtime.config.settings import Settings
    s = Settings()
    s.server.http_port = 0
    s.server.grpc_port = 0
    s.server.token = token
    s.server.drain_timeout_s = 5
    s.repository.path = repo
    s.repository.quiet_s = 0.3
    from runtime.config.settings import JobSettings
    s.jobs = JobSettings.model_validate({  # validated, as the config file's block is
        "path": jobs_path, "poll_s": 0.05, "backoff_s": 0.05, "callback_backoff_s": 0.05,
        "callback_secret": SECRET, **jobs})
    return s


def job_state(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()


def wait_states(base: str, ids, states=("succeeded",), timeout: float = 60) -> dict[str, dict]:
    """Every job in a terminal state (or one of `states`); the last view of each."""
    last: dict[str, dict] = {}

    def done():
        for i in ids:
            if last.get(i, {}).get("state") in states:
                continue
            last[i] = job_state(base, i)
        return all(last[i]["state"] in states for i in ids)
    wait_until(done, timeout, 0.1)
    return last


class Receiver:
    """A callback receiver on loopback: records (headers, lower-cased; body) of each POST; answers
    500 to the first `fail_first` POSTs of each job, then 200."""

    def __init__(self, fail_first: int = 0):
        self.got: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        seen: dict[str, int] = {}
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                job = self.headers.get("x-splitserve-job", "")
                with outer.lock:
                    seen[job] = seen.get(job, 0) + 1
                    n = seen[job]
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if n <= outer.fail_first else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def posts(self) -> list[tuple[dict, bytes]]:
        with self.lock:
            return list(self.got)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def now() -> float:
    return time.time()


class RedisServer:
    """A real redis-server child on a unix socket in a temporary folder: nothing to
    guess (redis cannot bind port 0 and report it), nothing shared with other tests."""

    def __init__(self, folder: Path):
        import shutil
        import subprocess
        exe = shutil.which("redis-server")
        if exe is None:
            import pytest
            pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
        folder.mkdir(parents=True, exist_ok=True)
        self.sock = folder / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(self.sock),
                                      "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                                      "--dir", str(folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._up, 20):
            self.stop()
            raise RuntimeError("redis-server did not answer PING on its socket")

    def _up(self) -> bool:
        import redis
        try:
            return redis.Redis(unix_socket_path=str(self.sock)).ping()
        except redis.exceptions.ConnectionError:
            return False

    def client(self):
        import redis
        return redis.Redis(unix_socket_path=str(self.sock))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
