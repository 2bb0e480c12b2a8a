"""`splitserve serve` as a user runs it: the first line comes before any load, the serving
line names the models and a next step that works, the token from --token-file is
enforced and never on the command line, and --log-format json is JSON on every line."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from runtime.logs import parse

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-" + "7f3a9c" * 6


class Child:
    """The CLI in a child process; stderr lines collected; `serving` once it says so."""

    def __init__(self, *args: str, cwd: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("SPLITSERVE_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", *args], cwd=cwd,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"event": "serving"' in line or "event=serving" in line:
                self.serving.set()
        self.serving.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.mark.slow
def test_serve_with_token_file_and_json_logs(make_repo, tmp_path):
    repo = make_repo({"mlp": {1: "st1"}})
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o600)
    child = Child("--repository", str(repo), "--http-port", "0", "--grpc-port", "0",
                  "--token-file", str(tf), "--log-format", "json", cwd=tmp_path)
    try:
        assert child.serving.wait(180) and child.proc.poll() is None, "".join(child.lines[-20:])
        docs = [json.loads(line) for line in child.lines]  # every line is one JSON object
        events = [d.get("event") for d in docs]
        assert events[0] == "starting" and "loaded" in events
        assert events.index("starting") < events.index("loaded") < events.index("serving")
        start = docs[0]
        assert start["auth"] == "token" and start["repository"] == str(repo.resolve())
        serving = docs[events.index("serving")]
        assert serving["models"] == "mlp:1"
        port = int(serving["http"].rsplit(":", 1)[1])
        assert serving["next"] == f"curl -s http://127.0.0.1:{port}/v2/health/ready"
        url = serving["next"].split()[-1]
        assert httpx.get(url, timeout=10).json() == {"ready": True}

        cmdline = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes()
        assert str(tf).encode() in cmdline and TOKEN.encode() not in cmdline
        assert TOKEN not in "".join(child.lines)
        put = f"http://127.0.0.1:{port}/v1/models/mlp/routing"
        routes = {"labels": {"stable": 1}, "weights": {"stable": 100}}
        assert httpx.put(put, json=routes, timeout=10).status_code == 401
        r = httpx.put(put, json=routes, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        rc = child.stop()
    assert rc == 0, "".join(child.lines[-20:])
    assert json.loads(child.lines[-1])["event"] == "stopped"


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.msgs: list[str] = []

    def emit(self, r):
        self.msgs.append(r.getMessage())


def test_serving_line_with_no_models_says_what_to_add(make_repo, serve):
    repo = make_repo({})
    lg, h = logging.getLogger("splitserve.server"), Captured()
    old = lg.level
    lg.setLevel(logging.INFO)
    lg.addHandler(h)
    try:
        srv = serve(repo)
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    (line,) = [m for m in h.msgs if m.startswith("event=serving ")]
    assert line.startswith(f"event=serving http=127.0.0.1:{srv.server.http_port} "
                           f"grpc=127.0.0.1:{srv.server.grpc_port} ")
    fields = {k: v for k, v, _ in parse(line)[0]}
    assert fields["models"] == "none"
    assert fields["next"] == f"add a version folder: {repo.resolve()}/<model>/1/model.pt2"


def test_wildcard_host_gives_a_loopback_curl(make_repo, serve):
    from runtime.server.banner import serving_line
    srv = serve(make_repo({"mlp": {1: "st1"}}))

    async def line(host):
        return serving_line(srv.core, host, 8000, 8001)

    for host, url in (("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("10.1.2.3", "10.1.2.3")):
        fields = {k: v for k, v, _ in parse(srv.call(line(host)))[0]}
        assert fields["models"] == "mlp:1"
        assert fields["next"] == f"curl -s http://{url}:8000/v2/health/ready"
