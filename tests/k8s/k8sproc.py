"""`python -m runtime serve` children for the Kubernetes tests: ports from the
`event=listening` line (bound before any model loads), stderr drained to the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"event=listening http=(\S+):(\d+) grpc=(\S+):(\d+)")

GATE = '''

# --- test gate: the build waits for a file named "release" beside this module -------
import time as _time
from pathlib import Path as _Path

_build = build_model


def build_model(**kwargs):
    gate, deadline = _Path(__file__).with_name("release"), _time.monotonic() + 60
    while not gate.exists() and _time.monotonic() < deadline:
        _time.sleep(0.02)
    return _build(**kwargs)
'''


def gate_model(model_dir: Path) -> Path:
    """Make the model's build block until `release` exists; returns that path."""
    py = model_dir / "model.py"
    py.write_text(py.read_text() + GATE)
    return model_dir / "release"


class ServeProcess:
    def __init__(self, repo: Path, config: Path | str | None, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "runtime", "serve", "--repository", str(repo),
               "--http-port", "0", "--grpc-port", "0", *args]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.http: str | None = None
        self.grpc: str | None = None
        self.http_port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = LISTENING.search(line)
            if m and self.http is None:
                self.http_port = int(m.group(2))
                self.http = f"http://{m.group(1)}:{m.group(2)}"
                self.grpc = f"{m.group(3)}:{m.group(4)}"
                self._listening.set()
        self._listening.set()

    def wait_listening(self, timeout: float = 120.0) -> ServeProcess:
        if not self._listening.wait(timeout) or self.http is None:
            self.kill()
            raise AssertionError("server did not listen:\n" + self.log())
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n" + self.log())
            try:
                if httpx.get(f"{self.http}/v2/health/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("server not ready in time:\n" + self.log())

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def wait_exit(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        self.terminate()
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode
