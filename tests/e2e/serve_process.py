"""`splitserve serve` as a real child process on OS-chosen ports (`--http-port 0
--grpc-port 0`), both read back from its `event=serving` log line: no port is guessed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HTTP = re.compile(r"event=serving\b.*?\bhttp=(\S+):(\d+)")
GRPC = re.compile(r"event=serving\b.*?\bgrpc=(\S+):(\d+)")


class ServeProcess:
    """One `python -m runtime serve ...` child; `http` / `grpc` once it serves."""

    def __init__(self, cwd: Path, *args: str):
        cmd = [sys.executable, "-m", "runtime", "serve", "--http-port", "0", "--grpc-port", "0",
               *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # the checkout's packages, after any PYTHONPATH the caller set (.ci/run puts a
        # protobuf build first): cwd may be a scratch folder without them
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in (env.get("PYTHONPATH"), str(ROOT)) if p])
        env.pop("SPLITSERVE_TOKEN", None)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.http: str | None = None
        self.grpc: str | None = None
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # drained to the end: the child never blocks on the pipe
            self.lines.append(line)
            h, g = HTTP.search(line), GRPC.search(line)
            if h and g and self.http is None:
                self.http = f"http://{h.group(1)}:{h.group(2)}"
                self.grpc = f"{g.group(1)}:{g.group(2)}"
                self._serving.set()
        self._serving.set()  # the child exited: stop waiting

    def wait_serving(self, timeout: float = 180.0) -> ServeProcess:
        if not self._serving.wait(timeout) or self.http is None:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-40:]))
        return self

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode
